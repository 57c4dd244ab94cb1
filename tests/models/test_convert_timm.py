"""fastcnn.convert on timm models, and its report: timm's ResNet blocks become fastcnn's fused blocks where that is
exact (same state_dict keys and values, same outputs and gradients as the timm model against a float64 oracle), blocks
with attention, anti-aliasing or stochastic depth are left with the reason, and the report lists what was fused and
what was left (timm's VGG head convs, torchvision's ResNet stem) and why."""
import copy
import logging

import pytest
import torch
import torch.nn as nn
import torchvision

import fastcnn
from fastcnn.nn import Bottleneck, ConvReLU2d, ConvReLUPool2d

from _parity import assert_step_parity

timm = pytest.importorskip("timm")

# name -> (timm.create_model arguments, input size, what its blocks or runs become, how many). zero_init_last=False:
# timm zero-inits each block's last BatchNorm weight, which would make every residual branch output zero here.
MODELS = {
    "resnet18": (dict(zero_init_last=False), 64, fastcnn.nn.BasicBlock, 8),
    "resnet50": (dict(zero_init_last=False), 64, Bottleneck, 16),
    "resnet26d": (dict(zero_init_last=False), 64, Bottleneck, 8),  # deep stem, avg-pool + conv + norm downsample
    # The head's 7x7 conv (left stock) is 512 x 4096 x 49 weights at mlp_ratio=1; 64 wide here it costs nothing.
    "vgg16": (dict(mlp_ratio=1 / 64), 32, (ConvReLU2d, ConvReLUPool2d), 13),
}


def _timm_model(name, dtype=torch.float32, **kwargs):
    """``timm.create_model(name)`` (no download), its BatchNorms given random affine parameters and running
    statistics so that eval mode normalises with something other than the identity."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.weight.uniform_(0.5, 1.5), module.bias.normal_(0, 0.1)
                    module.running_mean.normal_(0, 0.1), module.running_var.uniform_(0.5, 1.5)
    return model.to(dtype)


def _timm_blocks(model):
    return [name for name, m in model.named_modules()
            if isinstance(m, (timm.models.resnet.BasicBlock, timm.models.resnet.Bottleneck))]


def _assert_same_state(converted, stock):
    assert list(converted.state_dict()) == list(stock.state_dict())
    for key, value in stock.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    copy.deepcopy(converted).load_state_dict(stock.state_dict(), strict=True)
    copy.deepcopy(stock).load_state_dict(converted.state_dict(), strict=True)


# ResNet-50 in training mode runs in float64, as in tests/models/test_torchvision_parity.py: on a 2x3x64x64 batch its
# last stages' BatchNorms normalise over a few values per channel, and stock float32's own gradients are off the
# float64 oracle by up to 18% (measured, layer4.0.conv3.weight), so "2x stock's error" would measure noise.
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(MODELS))
def test_timm_models_convert_exactly(name, train):
    kwargs, size, fused_type, count = MODELS[name]
    dtype = torch.float64 if train and name == "resnet50" else torch.float32
    stock = _timm_model(name, dtype, **kwargs)
    oracle = copy.deepcopy(stock).double()
    converted, report = fastcnn.convert(stock, report=True)
    assert sum(isinstance(m, fused_type) for m in converted.modules()) == count
    assert not _timm_blocks(converted) and len(report.fused) >= count
    assert not any(isinstance(m, fused_type) for m in stock.modules())  # the input model is not modified
    _assert_same_state(converted, stock)
    x = torch.randn(4 if train else 2, 3, size, size)  # training: at least 16 values per BatchNorm channel (_parity)
    assert_step_parity(converted, stock, oracle, x, train=train)


@pytest.mark.parametrize("name, fused_type, fused, left", [
    ("resnext50_32x4d", Bottleneck, 16, []),  # grouped 3x3 convs, dilated in layer4: fastcnn's Bottleneck has both
    ("resnet18", fastcnn.nn.BasicBlock, 6, ["layer4.0", "layer4.1"]),  # fastcnn's BasicBlock is never dilated
])
def test_grouped_and_dilated_timm_blocks(name, fused_type, fused, left):
    stock = _timm_model(name, zero_init_last=False, output_stride=16)
    converted, report = fastcnn.convert(stock, report=True)
    assert sum(isinstance(m, fused_type) for m in converted.modules()) == fused and _timm_blocks(converted) == left
    assert [entry.reason for entry in report.left[1:]] == [
        "fastcnn's BasicBlock cannot be built for it: Dilation > 1 not supported in BasicBlock"] * len(left)
    _assert_same_state(converted, stock)
    assert_step_parity(converted, stock, copy.deepcopy(stock).double(), torch.randn(2, 3, 64, 64), train=False)


def _blocks_where(attribute, present):
    return lambda model: [name for name in _timm_blocks(model) if present(getattr(model.get_submodule(name),
                                                                                   attribute))]


# variant -> (resnet18 arguments, the blocks it makes unfusable, what the report says about them)
LEFT_VARIANTS = {
    "se": (dict(block_args=dict(attn_layer="se")), _blocks_where("se", lambda m: m is not None),
           "se is SEModule (attention on the residual branch)"),
    "drop_path": (dict(drop_path_rate=0.1), _blocks_where("drop_path", lambda m: m is not None),
                  "stochastic depth drops the residual branch at random in training"),
    "aa": (dict(aa_layer=nn.AvgPool2d), _blocks_where("aa", lambda m: type(m) is not nn.Identity),
           "aa is AvgPool2d (anti-aliasing pool on the strided path)"),
}


@pytest.mark.parametrize("variant", list(LEFT_VARIANTS))
def test_unfusable_timm_blocks_are_left_and_reported(variant):
    kwargs, unfusable, reason = LEFT_VARIANTS[variant]
    stock = _timm_model("resnet18", zero_init_last=False, **kwargs)
    oracle = copy.deepcopy(stock).double()
    converted, report = fastcnn.convert(stock, report=True)
    left = unfusable(stock)
    assert left and left == _timm_blocks(converted)
    assert sum(isinstance(m, fastcnn.nn.BasicBlock) for m in converted.modules()) == 8 - len(left)
    left_blocks = [entry for entry in report.left if entry.source == "timm.models.resnet.BasicBlock"]
    assert [entry.name for entry in left_blocks] == left
    assert all(reason in entry.reason for entry in left_blocks), left_blocks[0].reason
    _assert_same_state(converted, stock)
    assert_step_parity(converted, stock, oracle, torch.randn(2, 3, 64, 64), train=False)


def test_report_on_timm_vgg16_names_the_head_convs():
    _, report = fastcnn.convert(_timm_model("vgg16", mlp_ratio=1 / 64), report=True)
    assert report.summary() == "fastcnn.convert(VGG): fused 13 (8 ConvReLU2d, 5 ConvReLUPool2d); left 2 (2 Conv2d)"
    why = ("Conv2d: in timm.models.vgg.ConvMlp, whose own forward() decides what follows it: fastcnn fuses runs of "
           "plain nn.Sequential containers and known residual/Inception blocks")
    assert [str(entry) for entry in report.left] == [f"left   pre_logits.fc1: {why}", f"left   pre_logits.fc2: {why}"]
    assert str(report.fused[0]) == "fused  features.0: Conv2d, ReLU -> fastcnn.nn.ConvReLU2d"
    assert str(report.fused[1]) == "fused  features.2: Conv2d, ReLU, MaxPool2d -> fastcnn.nn.ConvReLUPool2d"
    assert str(report).splitlines() == [report.summary(), *map(str, report)] and len(report) == 15


def test_report_on_timm_resnet_blocks():
    _, report = fastcnn.convert(_timm_model("resnet18", block_args=dict(attn_layer="se")), report=True)
    assert report.summary() == "fastcnn.convert(ResNet): fused 0; left 9 (1 Conv2d, 8 BasicBlock)"
    assert str(report.left[1]) == ("left   layer1.0: timm.models.resnet.BasicBlock: se is SEModule (attention on "
                                   "the residual branch), which fastcnn's block does not compute")
    _, report = fastcnn.convert(_timm_model("resnet26d"), report=True)
    assert report.summary() == ("fastcnn.convert(ResNet): fused 10 (2 ConvBNReLU2d, 8 Bottleneck); "
                                "left 1 (1 Conv2d)")
    assert [str(entry) for entry in report][:3] == [
        "fused  conv1.0: Conv2d, BatchNorm2d, ReLU -> fastcnn.nn.ConvBNReLU2d",
        "fused  conv1.3: Conv2d, BatchNorm2d, ReLU -> fastcnn.nn.ConvBNReLU2d",
        "left   conv1.6: Conv2d: the last layer of its Sequential: no ReLU to fuse with"]
    assert str(report.fused[2]) == "fused  layer1.0: timm.models.resnet.Bottleneck -> fastcnn.nn.Bottleneck"


def test_report_on_torchvision_and_sequential_models_and_the_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="fastcnn"):
        _, report = fastcnn.convert(torchvision.models.resnet18(num_classes=3), report=True)
    assert [record.getMessage() for record in caplog.records] == [report.summary()]
    assert report.summary() == "fastcnn.convert(ResNet): fused 8 (8 BasicBlock); left 1 (1 Conv2d)"
    assert str(report.fused[0]) == "fused  layer1.0: torchvision.models.resnet.BasicBlock -> fastcnn.nn.BasicBlock"
    assert report.left[0].name == "conv1" and "in torchvision.models.resnet.ResNet, whose own forward()" \
        in report.left[0].reason

    stock = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(3, 1, padding=1),
                          nn.Conv2d(8, 8, 3), nn.Sigmoid(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    converted, report = fastcnn.convert(stock, report=True)
    assert isinstance(converted, nn.Sequential) and str(report).splitlines() == [
        "fastcnn.convert(Sequential): fused 1 (1 ConvReLU2d); left 2 (2 Conv2d)",
        "fused  0: Conv2d, ReLU -> fastcnn.nn.ConvReLU2d (the MaxPool2d after it stays a separate layer: only "
        "floor-mode pools without padding, dilation, indices or divisor_override are fused)",
        "left   3: Conv2d: followed by Sigmoid, not ReLU (fused runs are Conv2d[, BatchNorm2d], ReLU[, pool])",
        "left   5: Conv2d: followed by BatchNorm2d, the last layer of its Sequential: no ReLU to fuse with"]
    assert type(fastcnn.convert(stock)) is type(converted)  # without report=True: the model alone


class BasicBlock(torchvision.models.resnet.BasicBlock):  # named as torchvision's, so convert() looks at it
    def __init__(self, extra_child, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if extra_child:
            self.se = nn.Sigmoid()  # a child fastcnn's block would drop, whatever this class's forward does with it
        else:
            self.bn2.eps = 1e-3  # fastcnn's block would take bn1's settings for both norms


@pytest.mark.parametrize("extra_child, reason", [
    (True, "has se (Sigmoid), which fastcnn's BasicBlock does not compute"),
    (False, f"bn2 is {nn.BatchNorm2d(8, eps=1e-3)!r}; fastcnn's BasicBlock would have {nn.BatchNorm2d(8)!r}"),
])
def test_torchvision_style_blocks_that_differ_are_left(extra_child, reason):
    stock = nn.Sequential(BasicBlock(extra_child, 8, 8))
    converted, report = fastcnn.convert(stock, report=True)
    assert type(converted[0]) is BasicBlock
    assert [(entry.name, entry.reason) for entry in report] == [("0", reason)]
