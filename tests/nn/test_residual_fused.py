"""Behaviour of the fused blocks beyond one forward/backward: folded weights never stale, running-statistics
variants, saved-activation memory, no_grad, autocast and torch.compile."""
import copy
import functools

import pytest
import torch
import torch.nn as nn
from _residual_pairs import make_pair
from torchvision.models import resnet as tv

import fastcnn

from _blocks import backends_here, saved_bytes
from _tolerances import assert_close_to_oracle

BACKEND = [b for b in backends_here("cpu") if b not in ("triton", "reference")][:1] or ["reference"]


@pytest.fixture(autouse=True)
def _backend():
    with fastcnn.use_backend(BACKEND[0]):
        yield


def _bottleneck():
    return make_pair(fastcnn.nn.Bottleneck, tv.Bottleneck, dict(inplanes=16, planes=4, stride=2))


def test_folded_weights_follow_every_parameter_change():
    block, stock = (m.eval() for m in _bottleneck())
    x = torch.randn(2, 16, 9, 7)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(block(x.to(block.conv1.weight.dtype)), stock(x.to(block.conv1.weight.dtype)))

    check()
    other, _ = _bottleneck()  # new random BN statistics and weights, loaded in place
    block.load_state_dict(other.state_dict())
    stock.load_state_dict(other.state_dict())
    check()
    optimizer = torch.optim.SGD(list(block.parameters()) + list(stock.parameters()), lr=0.5)
    for p in list(block.parameters()) + list(stock.parameters()):
        p.grad = torch.ones_like(p)
    optimizer.step()  # an in-place update of every parameter
    check()
    with torch.no_grad():
        block.downsample[1].running_var.mul_(3)
        stock.downsample[1].running_var.mul_(3)
    check()
    block, stock = block.double(), stock.double()
    check()


@pytest.mark.parametrize("norm_layer", [
    functools.partial(nn.BatchNorm2d, momentum=None), functools.partial(nn.BatchNorm2d, track_running_stats=False),
    functools.partial(nn.BatchNorm2d, affine=False)], ids=["cumulative", "no-running-stats", "no-affine"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batch_norm_variants_match_stock(norm_layer, train):
    torch.manual_seed(5)
    stock = tv.BasicBlock(6, 6, norm_layer=norm_layer).train(train)
    block = fastcnn.nn.BasicBlock(6, 6, norm_layer=norm_layer).train(train)
    block.load_state_dict(stock.state_dict())
    for _ in range(3):
        x = torch.randn(2, 6, 5, 7)
        torch.testing.assert_close(block(x), stock(x))
    for name, buffer in stock.named_buffers():
        torch.testing.assert_close(block.get_buffer(name), buffer, msg=name)


def test_training_saves_at_least_a_quarter_less_activation_memory():
    block, stock = (m.train() for m in make_pair(fastcnn.nn.Bottleneck, tv.Bottleneck, dict(inplanes=64, planes=16)))
    x = torch.randn(4, 64, 14, 14, requires_grad=True)
    fused, eager = saved_bytes(block, x), saved_bytes(stock, x)
    assert fused <= 0.75 * eager, f"fused saves {fused} bytes, eager {eager}"


def test_no_grad_training_step_updates_running_stats_like_stock():
    block, stock = (m.train() for m in _bottleneck())
    x = torch.randn(2, 16, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(block(x), stock(x))
    for name, buffer in stock.named_buffers():
        torch.testing.assert_close(block.get_buffer(name), buffer, msg=name)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_autocast_bfloat16(train):
    block, stock = (m.train(train) for m in _bottleneck())
    oracle = copy.deepcopy(stock).double()
    x = torch.randn(2, 16, 9, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = block(x), stock(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_close_to_oracle(out, expected, oracle(x.double()), "out")


def test_torch_compile_fullgraph_train_and_eval():
    """Dynamo traces the whole block (no graph break) and AOT autograd runs the ops' fake kernels and backward
    (aot_eager: Inductor's C++ code generation would add minutes on a CPU runner without testing fastcnn more)."""
    block, _ = _bottleneck()
    reference = copy.deepcopy(block)
    compiled = torch.compile(block, fullgraph=True, dynamic=False, backend="aot_eager")
    x = torch.randn(2, 16, 9, 7, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    expected = reference(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(compiled.conv1.weight.grad, torch.autograd.grad(expected.sum(),
                                                                               reference.conv1.weight)[0])
    block.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference(x))
