"""Fused BasicBlock / Bottleneck against torchvision's blocks with the same state_dict: forward, backward and
running statistics, in train and eval mode, float32 / bfloat16, both memory formats, each backend here."""

import pytest
import torch
from _block_parity import assert_block_matches_stock
from _residual_pairs import make_pair
from torchvision.models import resnet as tv

import fastcnn

from _blocks import backends_here

COMPILED = [b for b in backends_here("cpu") if b not in ("triton", "reference")]

# (name, our class, torchvision class, constructor kwargs, input channels, input size)
CASES = [
    ("basic", fastcnn.nn.BasicBlock, tv.BasicBlock, dict(inplanes=6, planes=6), 6, (7, 9)),
    ("basic-down", fastcnn.nn.BasicBlock, tv.BasicBlock, dict(inplanes=5, planes=7, stride=2), 5, (9, 8)),
    ("bottleneck", fastcnn.nn.Bottleneck, tv.Bottleneck, dict(inplanes=12, planes=3), 12, (7, 5)),
    ("bottleneck-down-grouped", fastcnn.nn.Bottleneck, tv.Bottleneck,
     dict(inplanes=8, planes=4, stride=2, groups=2, base_width=32), 8, (9, 7)),
    ("bottleneck-dilated", fastcnn.nn.Bottleneck, tv.Bottleneck, dict(inplanes=16, planes=4, dilation=2), 16, (6, 6)),
]


def _out_channels(block):
    return (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features


def _out_size(x, block):
    return [(n - 1) // block.stride + 1 for n in x.shape[2:]]


# bfloat16 runs in channels_last (its fast layout); the reference backend runs the same module code on plain-PyTorch
# ops, so one setting suffices for it.
SETTINGS = [pytest.param(b, dtype, cl, id=f"{b}-{name}") for b in COMPILED
            for dtype, cl, name in ((torch.float32, False, "fp32-nchw"), (torch.float32, True, "fp32-nhwc"),
                                    (torch.bfloat16, True, "bf16-nhwc"))]
SETTINGS.append(pytest.param("reference", torch.float32, False, id="reference-fp32-nchw"))


@pytest.mark.parametrize("backend, dtype, channels_last", SETTINGS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_backward_and_running_stats_match_torchvision(case, train, backend, dtype, channels_last):
    _, ours, theirs, kwargs, channels, size = case
    block, stock = make_pair(ours, theirs, kwargs)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, channels, *size).to(dtype).contiguous(memory_format=fmt)
    grad_out = torch.randn(x.shape[0], _out_channels(block), *_out_size(x, block))
    assert_block_matches_stock(block, stock, x, grad_out, backend, train)
