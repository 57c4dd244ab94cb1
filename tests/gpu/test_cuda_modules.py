"""The fused modules and models on the GPU with the cuda backend forced (also what they pick by default), against
their stock twins holding the same state_dict: forward, backward and BatchNorm buffers, by the 2x-stock-error rule
against a float64 CPU oracle (tests/gpu/_gpu_cases.py). All `cuda`-marked; small shapes, one smoke case per module
and model x dtype x layout."""
import pytest
import torch
import torch.nn as nn

import fastcnn
from fastcnn import _extension

from _gpu_cases import assert_module_matches_stock, fmt

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not _extension.WITH_CUDA, reason="fastcnn._C was built without CUDA kernels")]
CASES = pytest.mark.parametrize("dtype, channels_last", [(torch.float32, False), (torch.float32, True),
                                                         (torch.bfloat16, True)], ids=["fp32-nchw", "fp32-nhwc",
                                                                                       "bf16-nhwc"])


def _x(shape, dtype, channels_last):
    return torch.randn(shape, device="cuda").to(dtype).contiguous(memory_format=fmt(channels_last))


def _twin(fused, stock):
    stock.load_state_dict(fused.state_dict())
    return fused, stock


@CASES
@pytest.mark.parametrize("pool", ["max", "avg", None])
def test_conv_relu_pool_modules(dtype, channels_last, pool):
    if pool is None:
        fused, stock = _twin(fastcnn.nn.ConvReLU2d(5, 7, 3, padding=1), nn.Sequential(nn.Conv2d(5, 7, 3, padding=1)))
        stock.append(nn.ReLU())
    else:
        fused = fastcnn.nn.ConvReLUPool2d(5, 7, 3, padding=1, pool=pool)
        stock = nn.Sequential(nn.Conv2d(5, 7, 3, padding=1), nn.ReLU(),
                              nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
        stock[0].load_state_dict(fused.state_dict())
    if pool is None:
        stock[0].load_state_dict(fused.state_dict())
    assert_module_matches_stock(fused, stock, _x((2, 5, 12, 10), dtype, channels_last))


@CASES
@pytest.mark.parametrize("activation", ["relu", None])
@pytest.mark.parametrize("kernel, stride, padding", [(2, 2, 0), (4, 2, 1), (3, 2, 1)], ids=["k2s2", "k4s2p1", "k3s2p1"])
def test_conv_transpose_module(dtype, channels_last, activation, kernel, stride, padding):
    fused = fastcnn.nn.ConvTranspose2d(6, 5, kernel, stride, padding, activation=activation)
    conv = nn.ConvTranspose2d(6, 5, kernel, stride, padding)
    conv.load_state_dict(fused.state_dict())
    stock = nn.Sequential(conv, nn.ReLU()) if activation else nn.Sequential(conv)
    assert_module_matches_stock(fused, stock, _x((2, 6, 7, 9), dtype, channels_last))


@CASES
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("pool", [True, False], ids=["pool", "nopool"])
def test_converted_conv_bn_relu_blocks(dtype, channels_last, train, pool):
    """ConvBNReLU2d / ConvBNReLUPool2d, FusedBatchNorm2d and FusedSequential, as convert() builds them."""
    layers = [nn.Conv2d(5, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()] + ([nn.MaxPool2d(2)] if pool else [])
    layers += [nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()]
    stock = nn.Sequential(*layers)
    with torch.no_grad():
        for m in stock:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
    fused = fastcnn.convert(stock)
    assert_module_matches_stock(fused, stock, _x((3, 5, 10, 12), dtype, channels_last), train=train)


@CASES
@pytest.mark.parametrize("block", ["BasicBlock", "Bottleneck"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_residual_blocks(dtype, channels_last, block, train):
    cls = getattr(fastcnn.nn, block)
    expansion = cls.expansion
    downsample = nn.Sequential(nn.Conv2d(16, 8 * expansion, 1, 2, bias=False), nn.BatchNorm2d(8 * expansion))
    fused = cls(16, 8, stride=2, downsample=downsample)
    stock = cls(16, 8, stride=2, downsample=nn.Sequential(nn.Conv2d(16, 8 * expansion, 1, 2, bias=False),
                                                          nn.BatchNorm2d(8 * expansion)), fused=False) \
        if "fused" in cls.__init__.__code__.co_varnames else None
    if stock is None:
        tv = pytest.importorskip("torchvision.models.resnet")
        stock = getattr(tv, block)(16, 8, stride=2, downsample=nn.Sequential(
            nn.Conv2d(16, 8 * expansion, 1, 2, bias=False), nn.BatchNorm2d(8 * expansion)))
    stock.load_state_dict(fused.state_dict())
    assert_module_matches_stock(fused, stock, _x((2, 16, 9, 9), dtype, channels_last), train=train)


@CASES
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_inception_block(dtype, channels_last, train):
    fused = fastcnn.nn.InceptionBlock(12, 4, 3, 6, 2, 3, 5)
    stock = fastcnn.nn.InceptionBlock(12, 4, 3, 6, 2, 3, 5, fused=False)
    stock.load_state_dict(fused.state_dict())
    assert_module_matches_stock(fused, stock, _x((2, 12, 9, 11), dtype, channels_last), train=train)


MODELS = [("vgg11", {}), ("vgg11_bn", {}), ("resnet18", {}), ("resnet50", {})]


@CASES
@pytest.mark.parametrize("name, kwargs", MODELS, ids=[m for m, _ in MODELS])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_models(dtype, channels_last, name, kwargs, train):
    fused = fastcnn.models.get_model(name, fused=True, num_classes=10, **kwargs)
    stock = fastcnn.models.get_model(name, fused=False, num_classes=10, **kwargs)
    stock.load_state_dict(fused.state_dict())
    assert_module_matches_stock(fused, stock, _x((2, 3, 32, 32), dtype, channels_last), train=train)


class _Seg(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0]


@CASES
def test_encoder_decoder(dtype, channels_last):
    fused = fastcnn.models.encoder_decoder("vgg11", num_seg_classes=3, fused=True, width=0.25)
    stock = fastcnn.models.encoder_decoder("vgg11", num_seg_classes=3, fused=False, width=0.25)
    stock.load_state_dict(fused.state_dict())
    assert_module_matches_stock(_Seg(fused), _Seg(stock), _x((2, 3, 32, 32), dtype, channels_last))
