"""fastcnn.nn.ConvReLU2d / ConvReLUPool2d are drop-in for nn.Conv2d (+ ReLU + pool)."""
import pytest
import torch
import torch.nn as nn

import fastcnn

from _blocks import backends_here, forward_backward
from _tolerances import assert_close_to_oracle

BACKENDS = [b for b in backends_here("cpu") if b != "triton"]


def stock_and_fused(pool_module, **conv_kwargs):
    torch.manual_seed(1)
    conv = nn.Conv2d(**conv_kwargs)
    torch.manual_seed(1)
    if pool_module is None:
        fused = fastcnn.nn.ConvReLU2d(**conv_kwargs)
        return nn.Sequential(conv, nn.ReLU()), fused
    kind = "max" if isinstance(pool_module, nn.MaxPool2d) else "avg"
    fused = fastcnn.nn.ConvReLUPool2d(**conv_kwargs, pool=kind, pool_size=pool_module.kernel_size,
                                      pool_stride=pool_module.stride)
    return nn.Sequential(conv, nn.ReLU(), pool_module), fused


POOL_MODULES = [None, nn.MaxPool2d(2), nn.AvgPool2d(2), nn.MaxPool2d(3, 2)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool_module", POOL_MODULES, ids=["relu", "max2", "avg2", "max3s2"])
@pytest.mark.parametrize("conv_kwargs", [
    dict(in_channels=3, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 5), stride=2, padding=(1, 2), dilation=(2, 1), groups=2),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding="same", bias=False),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=2, padding_mode="reflect"),
    dict(in_channels=3, out_channels=5, kernel_size=4, padding="same", padding_mode="circular"),
], ids=["plain", "strided-grouped-dilated", "same-nobias", "reflect", "same-circular"])
def test_same_init_state_dict_and_outputs_as_stock(backend, pool_module, conv_kwargs):
    stock, fused = stock_and_fused(pool_module, **conv_kwargs)
    assert list(fused.state_dict()) == ["weight", "bias"] if conv_kwargs.get("bias", True) else ["weight"]
    for key, value in fused.state_dict().items():
        torch.testing.assert_close(value, stock[0].state_dict()[key], atol=0, rtol=0)  # same init, same RNG draws
    x = torch.randn(2, conv_kwargs["in_channels"], 13, 15)
    with fastcnn.use_backend(backend):
        out, grad_out, (grad_x,) = forward_backward(fused, (x,))
    expected, _, (expected_grad_x,) = forward_backward(stock, (x,), grad_out)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad_x, expected_grad_x)
    for name, param in fused.named_parameters():
        torch.testing.assert_close(param.grad, stock[0].get_parameter(name).grad, msg=name)


def test_stock_state_dict_loads_strictly_both_ways():
    stock = nn.Conv2d(3, 8, 3)
    fused = fastcnn.nn.ConvReLUPool2d(3, 8, 3)
    fused.load_state_dict(stock.state_dict(), strict=True)
    stock.load_state_dict(fused.state_dict(), strict=True)
    assert isinstance(fused, nn.Conv2d)  # so model code that initialises every nn.Conv2d reaches it too


@pytest.mark.parametrize("pool_module", POOL_MODULES[1:], ids=["max2", "avg2", "max3s2"])
def test_from_modules_shares_parameters_and_matches(pool_module):
    conv = nn.Conv2d(3, 6, 3, padding=1)
    fused = fastcnn.nn.ConvReLUPool2d.from_modules(conv, nn.ReLU(inplace=True), pool_module)
    assert fused.weight is conv.weight and fused.bias is conv.bias
    x = torch.randn(2, 3, 11, 9)
    torch.testing.assert_close(fused(x), nn.Sequential(conv, nn.ReLU(), pool_module)(x))
    relu_only = fastcnn.nn.ConvReLU2d.from_modules(conv, nn.ReLU())
    torch.testing.assert_close(relu_only(x), torch.relu(conv(x)))


@pytest.mark.parametrize("pool_module,match", [
    (nn.MaxPool2d(2, padding=1), "cannot fuse"),
    (nn.MaxPool2d(2, ceil_mode=True), "cannot fuse"),
    (nn.AvgPool2d(2, divisor_override=3), "cannot fuse"),
    (nn.Identity(), "pool must be an nn.MaxPool2d or nn.AvgPool2d"),
])
def test_from_modules_refuses_what_it_cannot_fuse(pool_module, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastcnn.nn.ConvReLUPool2d.from_modules(nn.Conv2d(3, 6, 3), nn.ReLU(), pool_module)
    with pytest.raises(TypeError, match="relu must be an nn.ReLU"):
        fastcnn.nn.ConvReLU2d.from_modules(nn.Conv2d(3, 6, 3), nn.GELU())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_in_the_autocast_dtype_like_conv2d(dtype):
    block = fastcnn.nn.ConvReLUPool2d(3, 8, 3, padding=1)
    stock = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    stock[0].load_state_dict(block.state_dict())
    x = torch.randn(2, 3, 12, 12)
    with torch.autocast("cpu", dtype=dtype):
        out, expected = block(x), stock(x)
    assert out.dtype == expected.dtype == dtype
    oracle = stock.double()(x.double())
    assert_close_to_oracle(out, expected, oracle, "autocast output")


def test_inference_mode_saves_nothing_and_matches():
    block = fastcnn.nn.ConvReLUPool2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 12, 12)
    with torch.inference_mode():
        out = block(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, torch.max_pool2d(torch.relu(block._conv_forward(x, block.weight, block.bias)), 2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool_module", POOL_MODULES, ids=["relu", "max2", "avg2", "max3s2"])
def test_channels_last_module_matches_stock(backend, pool_module):
    """The whole module in channels_last (weights included), as `model.to(memory_format=torch.channels_last)` does."""
    stock, fused = stock_and_fused(pool_module, in_channels=3, out_channels=8, kernel_size=3, padding=1)
    stock, fused = (m.to(memory_format=torch.channels_last) for m in (stock, fused))
    x = torch.randn(2, 3, 12, 11).contiguous(memory_format=torch.channels_last)
    with fastcnn.use_backend(backend):
        out, grad_out, (grad_x,) = forward_backward(fused, (x,))
    expected, _, (expected_grad_x,) = forward_backward(stock, (x,), grad_out)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad_x, expected_grad_x)
    for name, param in fused.named_parameters():
        torch.testing.assert_close(param.grad, stock[0].get_parameter(name).grad, msg=name)
