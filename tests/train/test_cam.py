"""CAM and Grad-CAM: the exact identity for GAP + linear heads; fused models' maps equal to the stock models' at every
layer, inside fused blocks too; the errors and warnings that name layers; the three-panel PNG; and the `fastcnn cam`
command's argument errors."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from torchvision.models.googlenet import Inception as TorchvisionInception

from fastcnn import cli
from fastcnn.models import get_model
from fastcnn.nn import InceptionBlock
from fastcnn.train import save_checkpoint
from fastcnn.train.cam import DegenerateMapWarning, GradCAM, cam, cam_figure, explain_to_png, overlay


class GapNet(nn.Module):
    """conv -> in-place ReLU -> conv -> in-place ReLU -> GAP -> linear (ResNet's head in miniature)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class SpareLayers(GapNet):
    """GapNet plus a registered layer the forward never calls and one whose output it throws away."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Conv2d(3, 4, 1)
        self.discarded = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        self.discarded(x)
        return super().forward(x)


def _randomize_norms(model):
    """Non-trivial BatchNorm state, as in a trained network (a fresh one's BatchNorms are near identities)."""
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.weight.uniform_(0.5, 1.5), norm.bias.normal_(0, 0.5)
            norm.running_mean.normal_(0, 0.5), norm.running_var.uniform_(0.5, 2)
    return model.eval()


def _fused_twin(fused, stock):
    fused.load_state_dict(stock.state_dict())
    return fused.eval()


def _plain_output_shape(model, layer, images):
    """The shape of ``layer``'s output in an ordinary forward of ``model``; None when its forward hooks never fire
    (a fused block does not call its child modules)."""
    shapes = []
    handle = layer.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.shape)))
    with torch.no_grad():
        model(images)
    handle.remove()
    return shapes[-1] if shapes else None


def _assert_same_maps(fused, stock, layers, images):
    """Grad-CAM of every layer in ``layers`` on ``fused`` equals, bit for bit, the one on ``stock``: under
    fastcnn.nn.unfused() the fused model runs the stock modules' very operations."""
    results = []
    for model in (fused, stock):
        with GradCAM(model, layers) as grad_cam:
            grad_cam(images)
        results.append((grad_cam.layer_maps, grad_cam.classes))
        assert all(parameter.grad is None for parameter in model.parameters())  # the model's .grad untouched
    (fused_maps, fused_classes), (stock_maps, stock_classes) = results
    torch.testing.assert_close(fused_classes, stock_classes, rtol=0, atol=0)
    for name in layers:
        assert fused_maps[name].shape == images[:, 0].shape and stock_maps[name].std() > 0, name
        torch.testing.assert_close(fused_maps[name], stock_maps[name], rtol=0, atol=0,
                                   msg=lambda message, name=name: f"layer {name}: {message}")


def test_grad_cam_at_the_last_feature_map_equals_cam():
    model = GapNet().double().eval()
    images = torch.randn(3, 3, 9, 11, dtype=torch.float64)
    with GradCAM(model, [model.features]) as grad_cam:
        maps = grad_cam(images)
    expected = cam(model, images, model.features, model.fc)
    assert maps.shape == (3, 9, 11) and maps.min() >= 0 and maps.max() <= 1
    torch.testing.assert_close(maps, expected.to(maps.dtype), rtol=0, atol=1e-12)
    fixed = cam(model, images, model.features, model.fc, targets=2)
    with GradCAM(model, "features") as grad_cam:  # a module name works as well as the module
        torch.testing.assert_close(grad_cam(images, targets=2), fixed.to(torch.float64), rtol=0, atol=1e-12)


def test_hooking_a_conv_followed_by_inplace_relu_and_removing_hooks():
    model = GapNet().eval()
    conv = model.features[2]
    with GradCAM(model, [conv]) as grad_cam:
        maps = grad_cam(torch.randn(2, 3, 8, 8))
        assert conv._forward_hooks
        model(torch.randn(1, 3, 8, 8)[:, :, :1, :1])  # the model's own forwards in between are left alone
    assert not conv._forward_hooks and torch.isfinite(maps).all()
    with pytest.raises(TypeError, match="target_layers"):
        GradCAM(model, [])


def test_fused_resnet18_maps_equal_torchvision_at_every_conv_and_inside_blocks():
    stock = _randomize_norms(torchvision.models.resnet18(num_classes=10))
    fused = _fused_twin(get_model("resnet18", num_classes=10), stock)
    images = torch.randn(2, 3, 64, 64)  # layer4 is 2x2 here, so every map has more than one value
    assert _plain_output_shape(fused, fused.layer4[1].conv2, images) is None  # the bug: the fused block skips it
    convs = [name for name, module in stock.named_modules() if isinstance(module, nn.Conv2d)]
    assert len(convs) == 20 and "layer4.1.conv2" in convs
    layers = convs + ["layer1.0.bn1", "layer4.1", "layer2.0.downsample", "layer3.1.relu", "layer3"]
    _assert_same_maps(fused, stock, layers, images)


def test_fused_vgg11_bn_maps_equal_stock_at_every_features_slot():
    options = {"width": 0.25, "hidden_features": 32, "num_classes": 10}
    stock = _randomize_norms(get_model("vgg11_bn", fused=False, **options))
    fused = _fused_twin(get_model("vgg11_bn", fused=True, **options), stock)
    images = torch.randn(2, 3, 64, 64)
    # Fused, the conv's slot outputs conv + BN + ReLU + pool: a hook there sees another tensor than the stock conv's.
    assert _plain_output_shape(fused, fused.features[0], images) == (2, 16, 32, 32)
    layers = [f"features.{index}" for index in range(len(stock.features))] + ["features"]
    assert len(layers) == 30
    _assert_same_maps(fused, stock, layers, images)


def test_fused_inception_block_maps_equal_torchvision():
    args = (8, 4, 5, 6, 3, 4, 3)  # in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 + 6 + 4 + 3, 5)]
    stock = _randomize_norms(nn.Sequential(TorchvisionInception(*args), *head))
    fused = _fused_twin(nn.Sequential(InceptionBlock(*args), *head), stock)
    images = torch.randn(2, 8, 13, 11)
    assert _plain_output_shape(fused, fused[0].branch2[1].conv, images) is None
    layers = ["0" + (f".{name}" if name else "") for name, _ in stock[0].named_modules()]
    assert "0.branch3.1.bn" in layers and "0.branch4.0" in layers
    _assert_same_maps(fused, stock, layers, images)


def test_a_layer_that_never_ran_or_reaches_no_logit_is_named():
    model = SpareLayers().eval()
    images = torch.randn(1, 3, 8, 8)
    with GradCAM(model, ["unused"]) as grad_cam, pytest.raises(ValueError, match="'unused' produced no output"):
        grad_cam(images)
    with GradCAM(model, [model.discarded]) as grad_cam, \
            pytest.raises(ValueError, match="'discarded' received no gradient"):
        grad_cam(images)
    with GradCAM(model, ["fc"]) as grad_cam, pytest.raises(ValueError, match=r"\(N, C, H, W\).*'fc' outputs"):
        grad_cam(images)
    with pytest.raises(ValueError, match="layer 'feature.0' is not a module.*close names: features.0"):
        GradCAM(model, ["feature.0"])
    with GradCAM(model, ["features"]) as grad_cam, pytest.raises(ValueError, match=r"target classes .*\[0, 5\)"):
        grad_cam(images, targets=5)


def test_a_1x1_map_warns_and_names_the_last_larger_layer():
    model = get_model("resnet18", num_classes=10).eval()
    with GradCAM(model, ["layer4.1.conv2"]) as grad_cam, \
            pytest.warns(DegenerateMapWarning, match=r"'layer4.1.conv2'.*1×1.*e\.g\. 'layer3' \(2×2\)"):
        maps = grad_cam(torch.randn(1, 3, 32, 32))  # the CLI's default size: layer4 is 1x1
    assert maps.shape == (1, 32, 32) and grad_cam.larger_layer() == ("layer3", (2, 2))


def test_a_constant_map_warns():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with GradCAM(model.eval(), ["0"]) as grad_cam, \
            pytest.warns(DegenerateMapWarning, match=r"'0'.*constant for image\(s\) \[0\].*e\.g\. '1' \(6×6\)"):
        grad_cam(torch.ones(1, 3, 6, 6))  # a 1x1 conv of a constant image: the same value everywhere


def _wide_ink_runs(pixels, min_width):
    """Runs of non-white columns at least ``min_width`` wide along the middle row of an (H, W, 3) image."""
    ink = (pixels[pixels.shape[0] // 2] < 250).any(1)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], ink.astype(np.int8), [0]])))
    return [end - start for start, end in zip(edges[::2], edges[1::2]) if end - start >= min_width]


def test_png_shows_image_heatmap_with_colour_bar_and_overlay(tmp_path):
    model = GapNet().eval()
    image = torch.randn(3, 16, 16)
    blended = overlay(image[:1], torch.rand(16, 16))
    assert blended.shape == (16, 16, 3) and 0 <= blended.min() and blended.max() <= 1
    figure = cam_figure(image, torch.rand(16, 16))
    panels = [axes for axes in figure.axes if axes.images]
    assert len(panels) == 3 and panels[1].images[0].colorbar is not None and len(figure.axes) == 4
    path = tmp_path / "cam.png"
    target = explain_to_png(model, image, str(path))
    assert 0 <= target < 5
    with Image.open(path) as png:
        assert png.format == "PNG"
        width, height = png.size
        pixels = np.asarray(png.convert("RGB"))
    assert width > 2 * height
    assert len(_wide_ink_runs(pixels, height // 4)) == 3  # three panels; the colour bar is a narrow run
    with pytest.raises(ValueError, match="layer 'nope'"):
        explain_to_png(model, image, str(path), layer="nope")


SMALL_VGG = ["--model", "vgg11", "--width", "0.125", "--hidden-features", "32", "--image-size", "32"]


@pytest.mark.parametrize("argv, messages", [
    (["--target", "10"], ["--target must be a class in [0, 10)", "got 10"]),
    (["--target", "-1"], ["--target must be a class in [0, 10)"]),
    (["--layer", "features.99"], ["--layer", "'features.99' is not a module", "features.9"]),
    (["--layer", "zzz"], ["--layer", "valid names include features, avgpool, classifier"]),
    (["--batch-size", "8"], ["--batch-size: not used by cam"]),
    (["--precision", "bf16-mixed", "--channels-last", "--workers", "2"],
     ["--workers, --precision, --channels-last: not used by cam"]),
])
def test_cam_command_argument_errors_name_the_argument(argv, messages, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["cam", *SMALL_VGG, *argv])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith("fastcnn cam: error:") and error.count("\n") == 1
    assert all(message in error for message in messages), error


def test_cam_command_hides_the_options_it_refuses(capsys):
    with pytest.raises(SystemExit):
        cli.main(["cam", "--help"])
    help_text = capsys.readouterr().out
    assert "--layer" in help_text and "--batch-size" not in help_text and "--precision" not in help_text


def test_cam_command_explains_a_fused_resnet_checkpoint(tmp_path, capsys):
    checkpoint = tmp_path / "last.pt"
    save_checkpoint(str(checkpoint), {"model": get_model("resnet18", num_classes=10).state_dict()})
    png = tmp_path / "cam.png"
    argv = ["cam", "--model", "resnet18", "--checkpoint", str(checkpoint), "--out", str(png)]
    assert cli.main(argv) == 0  # the command: a fused block's conv2, at the default 32 px
    output = capsys.readouterr()
    assert "at layer4.1.conv2 written to" in output.out
    assert "fastcnn cam: warning: Grad-CAM at 'layer4.1.conv2': its output is 1×1" in output.err
    assert "e.g. 'layer3' (2×2)" in output.err
    assert cli.main([*argv, "--layer", "layer3"]) == 0
    assert "warning" not in capsys.readouterr().err
    with Image.open(png) as image:
        assert image.size[0] > image.size[1]


def test_cam_command_refuses_a_checkpoint_of_another_model_in_one_line(tmp_path, capsys):
    checkpoint = tmp_path / "last.pt"
    save_checkpoint(str(checkpoint), {"model": get_model("resnet18", num_classes=10).state_dict()})
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["cam", *SMALL_VGG, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "cam.png")])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith("fastcnn cam: error:") and error.count("\n") == 1
    assert "seems to hold resnet18" in error, error


def test_cam_command_builds_the_model_of_the_options(tmp_path, capsys):
    """--channels 1 reaches cam's model, so a 1-channel checkpoint of `fastcnn train` loads."""
    model = get_model("vgg11", num_classes=10, width=0.125, hidden_features=32)
    one_channel = {k: (v[:, :1] if k == "features.0.weight" else v) for k, v in model.state_dict().items()}
    checkpoint = tmp_path / "last.pt"
    save_checkpoint(str(checkpoint), {"model": one_channel})
    argv = ["cam", *SMALL_VGG, "--channels", "1", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "c.png")]
    assert cli.main(argv) == 0, capsys.readouterr().err
