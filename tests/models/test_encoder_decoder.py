"""The encoder-decoder multi-task model, its loss and the download-free segmentation data."""
import pytest
import torch

from fastcnn.data.segmentation import SampleImageMasks, SyntheticShapes
from fastcnn.models.encoder_decoder import encoder_decoder
from fastcnn.nn.multitask_loss import MultiTaskLoss


def test_shapes_heads_and_divisibility_error():
    model = encoder_decoder("vgg11", num_classes=3, num_seg_classes=4)
    seg, cls = model(torch.randn(2, 3, 32, 32))
    assert seg.shape == (2, 4, 32, 32) and cls.shape == (2, 3)
    seg, cls = encoder_decoder("vgg11", num_classes=None, num_seg_classes=2, upsample="bilinear")(
        torch.randn(1, 3, 32, 64))
    assert seg.shape == (1, 2, 32, 64) and cls is None
    with pytest.raises(ValueError, match="divisible by the encoder's total stride 32"):
        model(torch.randn(1, 3, 40, 32))


def test_fused_and_stock_models_share_state_dict_and_outputs():
    fused = encoder_decoder("vgg11", num_classes=3, num_seg_classes=4)
    stock = encoder_decoder("vgg11", num_classes=3, num_seg_classes=4, fused=False)
    stock.load_state_dict(fused.state_dict())
    x = torch.rand(2, 3, 32, 32)
    for got, expected in zip(fused(x), stock(x)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_training_steps_reduce_both_losses():
    data = SyntheticShapes(16)
    images, masks, labels = (torch.stack(t) for t in zip(*(data[i] for i in range(len(data)))))
    model = encoder_decoder("vgg11", num_classes=3, num_seg_classes=4)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    loss_fn, history = MultiTaskLoss(dice_weight=0.5), []
    for _ in range(6):
        seg, cls = model(images)
        loss, parts = loss_fn(seg, masks, cls, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(parts)
    assert history[-1]["seg"] < history[0]["seg"] and history[-1]["cls"] < history[0]["cls"]


def test_width_narrows_a_vgg_encoder_and_its_decoder():
    model = encoder_decoder("vgg11", num_classes=3, num_seg_classes=4, width=0.25)
    assert model.encoder[0][0].out_channels == 16 and model.cls_head.in_features == 128
    seg, cls = model(torch.randn(1, 3, 32, 32))
    assert seg.shape == (1, 4, 32, 32) and cls.shape == (1, 3)
    with pytest.raises(ValueError, match="width applies to a VGG encoder only"):
        encoder_decoder("resnet18", width=0.5)


def test_datasets_are_deterministic_with_known_masks():
    image, mask, label = SyntheticShapes(4, seed=1)[2]
    again = SyntheticShapes(4, seed=1)[2]
    assert torch.equal(image, again[0]) and torch.equal(mask, again[1])
    assert set(mask.unique().tolist()) == {0, int(label) + 1}
    image, mask, label = SampleImageMasks(length=2, size=48)[1]
    assert image.shape == (1, 48, 48) and mask.dtype == torch.long and 0 < mask.float().mean() < 1
