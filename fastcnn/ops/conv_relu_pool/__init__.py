"""fastcnn's fused Conv2d + bias + ReLU (+ max/avg pool): argument checks, the public function and its route table.

Backends, in the order tried (`ROUTES`): on CUDA tensors "cuda" (cuDNN convolution + fastcnn's fused epilogue and
backward kernels), then "triton" (implicit-GEMM convolution with the pool in its epilogue); on CPU tensors "cpu"
(oneDNN's convolution + one C++ epilogue pass, or where `winograd_runs` fastcnn's Winograd F(2x2, 3x3), with a
2x2 max pool taken in its output transform - for a 2x2 max pool also on NCHW input, whose weight gradient is
Winograd's too where the shape fits: see csrc/conv_relu_pool.cpp); "reference" (plain PyTorch) everywhere. The
CUDA order is provisional until the kernels are timed on a GPU (see benchmarks/); forcing a backend is possible
with fastcnn.set_backend.
"""
import torch

from .._args import check_float_tensors, check_same_device_and_dtype, conv_output_size, pair
from .._dispatch import (
    CPU_RESULTS,
    STOCK,
    Route,
    RouteTable,
    autocast,
    call_mode,
    load_triton,
    route,
    stock_routable,
)
from ..conv2d import winograd_runs, winograd_weight_grad_runs
from . import reference
from . import register  # noqa: F401  (fakes and autograd of the C++ ops, when fastcnn._C has them)
from .reference import POOLS

_triton, _TRITON_WHY_NOT = load_triton(".register_triton", __name__)

SMALL_OUTPUT = 1 << 17  # N * C_out * H * W below which a call is "small" (between a 65k loss and a 131k win)
# Output elements from which a recorded NCHW call without a pool, which wins by Winograd's weight gradient alone, wins
# at all (between a 200k loss and a 401k win: the ROUTES comments).
WEIGHT_GRAD_WIN_OUTPUT = 1 << 18


def conv_output_elements(input, weight):
    """``N * C_out * H * W``: the convolution output's elements at stride 1, over which a fused epilogue saves its
    pass (while its fixed cost is per call) - what the CPU size classes of the fused conv blocks count. The input's
    elements alone would call the first layer of a network (3 channels in, 16 out) small, where fastcnn wins most."""
    n, _, h, w = input.shape
    return n * weight.shape[0] * h * w


def _size_class(input, weight, stride, padding, dilation, groups, mode):
    """"winograd" where fastcnn's CPU Winograd serves the call - its forward on channels_last input, and for a
    recorded call without a pool (mode "relu-train") of at least WEIGHT_GRAD_WIN_OUTPUT output elements its weight
    gradient, which runs on NCHW input too - else "small" or "large" by `conv_output_elements`."""
    output = conv_output_elements(input, weight)
    if winograd_runs(input, weight, stride, padding, dilation, groups) or (
            mode == "relu-train" and output >= WEIGHT_GRAD_WIN_OUTPUT
            and winograd_weight_grad_runs(input, weight, stride, padding, dilation, groups)):
        return "winograd"
    return "small" if output < SMALL_OUTPUT else "large"


ROUTES = RouteTable("conv2d_relu_pool", [
    Route("cuda", device="cuda"),
    Route("triton", device="cuda"),
    # Where the CPU convolution is fastcnn's Winograd (winograd_runs: channels_last, 3x3 stride 1, enough tiles and
    # channels), fastcnn wins with or without a pool. Paired rounds against stock eager, batch 2 unless noted:
    # VGG-16 blocks 1-5 forward 1.36-1.59x, forward+backward 1.39-1.71x (conv_block.json); 128 channels at 28-112
    # px and batch 1-8 at 56 px 1.32-1.54x / 1.30-1.68x with the pool (conv_block_sweep_channels_last.json) and
    # 1.15-1.37x / 1.22-1.50x without (conv_block_sweep_pool-none_channels_last.json).
    Route("cpu", measured=f"{CPU_RESULTS}_conv_block_sweep_pool-none_channels_last.json#2x128x28x28-8x128x56x56",
          device="cpu", size="winograd"),
    # In channels_last, where the convolution is oneDNN's (too few tiles or channels for Winograd), the fused path
    # loses (fastcnn[cpu]): 2x3->16x64x64 ... 2x64->128x8x8 forward 0.64-0.72x, forward+backward 0.85-0.88x, and
    # 2x128x14x14 0.82x / 0.91x (conv_block_sweep_channels_last.json). So stock runs: routed there, the module
    # measured 0.98-1.03x in both modes (the same sweep).
    Route(STOCK, measured=f"{CPU_RESULTS}_conv_block_sweep_channels_last.json#2x3x64x64-2x64x8x8", device="cpu",
          layout="channels_last"),
    # CPU, fp32, stock / fastcnn[cpu] in paired rounds (conv_block_sweep.json). Small calls lose: the op's fixed
    # cost per call (its Python argument layer, a second pass, the code's allocation) outweighs the passes it saves -
    # 2x128x14x14 0.85x forward / 0.90x forward+backward, the encoder-decoder's 2x16->32x32x32 (65k output elements)
    # 0.91x / 0.94x and smaller 0.66-0.77x / 0.83-0.87x; from 2x3->16x64x64 (131k) on fastcnn wins, 1.43-1.75x
    # forward and 1.18-1.34x forward+backward. So below SMALL_OUTPUT output elements stock runs (routed: 0.99-1.02x).
    Route(STOCK, measured=f"{CPU_RESULTS}_conv_block_sweep.json#2x128x14x14,2x16x32x32-2x64x8x8", device="cpu",
          size="small"),
    # Without a pool there is no pass to save on CPU: stock's oneDNN convolution adds the bias and the ReLU runs in
    # place, where fastcnn's epilogue is a second pass - NCHW forward 0.63-0.98x at every size of the sweep
    # (conv_block_sweep_pool-none.json, fastcnn[cpu]). Where autograd records the call and the weight gradient is
    # Winograd's (mode "relu-train", size "winograd": 128 channels at 56-112 px, batch 1-8 at 56 px), forward+backward
    # ran 0.99-1.08x; at 28 px (200k output elements, below WEIGHT_GRAD_WIN_OUTPUT) 0.96-0.99x in two runs, and
    # elsewhere 0.79-0.88x. So only those run fastcnn's (routed: 0.99-1.08x), the rest stock (routed: 0.97-1.00x).
    Route("cpu", measured=f"{CPU_RESULTS}_conv_block_sweep_pool-none.json#2x128x56x56-8x128x56x56", device="cpu",
          mode="relu-train", size="winograd"),
    Route(STOCK, measured=f"{CPU_RESULTS}_conv_block_sweep_pool-none.json#2x128x14x14-2x128x112x112", device="cpu",
          mode="relu"),
    Route(STOCK, measured=f"{CPU_RESULTS}_conv_block_sweep_pool-none.json#2x128x14x14,2x128x28x28,2x3x64x64-2x64x8x8",
          device="cpu", mode="relu-train"),
    # VGG-16 block-ending convs at batch 2, NCHW (conv_block.json), whose forward is Winograd's with the pool in its
    # output transform and whose weight gradient is Winograd's from 128 channels: forward 1.36-1.86x,
    # forward+backward 1.12-1.29x (block1, 64 channels, 1.12x: its weight gradient is oneDNN's).
    Route("cpu", measured=f"{CPU_RESULTS}_conv_block.json#block1-block5", device="cpu"),
], compiled=register.COMPILED_OPS, triton=_TRITON_WHY_NOT, no_float64=("triton",))


def route_mode(pool, input, weight, bias):
    """The mode `ROUTES` keys on: "relu-pool" with a pool; without one "relu-train" where autograd records the call
    (its backward can win, `call_mode`) and "relu" where it does not."""
    if pool != "none":
        return "relu-pool"
    return "relu-train" if call_mode(input, weight, bias) == "train" else "relu"


def runs_stock(input, weight, mode, stride, padding, dilation, groups):
    """True where `ROUTES` sends a call on tensor `input` in `mode` (`route_mode`) with these arguments to stock
    PyTorch (outside autocast, under which the op routes on the cast dtype): a fused conv module then runs as the
    stock layers it replaces, without the op's argument layer (stock's own checks apply, as they would to those
    layers). The modules remember the answer per input signature and mode (`module_runs_stock`)."""
    return stock_routable(input) and ROUTES.choose(
        input, mode, _size_class(input, weight, stride, padding, dilation, groups, mode)) == STOCK


def check_conv_relu_pool(input, weight, bias, stride, padding, dilation, groups, pool, pool_size, pool_stride):
    """Validates one call; returns the normalized (stride, padding, dilation, pool_size, pool_stride)."""
    check_float_tensors(input=input, weight=weight)
    if input.dim() != 4:
        raise ValueError(f"fastcnn: input must be 4-D (N, C, H, W), got a {input.dim()}-D tensor of shape "
                         f"{tuple(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"fastcnn: weight must be 4-D (C_out, C_in / groups, kH, kW), got shape {tuple(weight.shape)}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"fastcnn: groups must be a positive int, got {groups!r}")
    if weight.shape[0] % groups != 0:
        raise ValueError(f"fastcnn: weight's {weight.shape[0]} output channels are not divisible by groups={groups}")
    if input.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"fastcnn: input has {input.shape[1]} channels, but weight of shape {tuple(weight.shape)} "
                         f"with groups={groups} expects {weight.shape[1] * groups}")
    check_same_device_and_dtype(input, weight=weight, bias=bias)
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"fastcnn: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    stride, padding, dilation = pair(stride, "stride", 1), pair(padding, "padding", 0), pair(dilation, "dilation", 1)
    conv_size = conv_output_size(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    if min(conv_size) < 1:
        raise ValueError(f"fastcnn: input of spatial size {tuple(input.shape[2:])} with padding {padding} is smaller "
                         f"than the kernel {tuple(weight.shape[2:])} with dilation {dilation}")
    if pool not in POOLS:
        raise ValueError(f"fastcnn: pool must be one of {POOLS}, got {pool!r}")
    if pool == "none":
        return stride, padding, dilation, (1, 1), (1, 1)
    pool_size = pair(pool_size, "pool_size", 1)
    pool_stride = pool_size if pool_stride is None else pair(pool_stride, "pool_stride", 1)
    area, limit = pool_size[0] * pool_size[1], 256 if pool == "max" else 8
    if area > limit:
        raise ValueError(f"fastcnn: {pool} pooling supports windows of at most {limit} elements, got pool_size "
                         f"{pool_size}")
    if conv_size[0] < pool_size[0] or conv_size[1] < pool_size[1]:
        raise ValueError(f"fastcnn: the convolution output {conv_size} is smaller than pool_size {pool_size}")
    return stride, padding, dilation, pool_size, pool_stride


def conv2d_relu_pool(input, weight, bias, stride, padding, dilation, groups, pool, pool_size, pool_stride):
    """``pool(relu(conv2d(input, weight, bias, ...)))``; see fastcnn.functional.conv2d_relu_pool for the contract.

    Example:
        >>> conv2d_relu_pool(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), None, 1, 1, 1, 1, "max", 2, None).shape
        torch.Size([2, 4, 4, 4])
    """
    input, weight, bias = autocast(input, weight, bias)
    stride, padding, dilation, pool_size, pool_stride = check_conv_relu_pool(
        input, weight, bias, stride, padding, dilation, groups, pool, pool_size, pool_stride)
    mode = route_mode(pool, input, weight, bias)
    backend = route(ROUTES, input, mode, _size_class(input, weight, stride, padding, dilation, groups, mode))
    if backend == "reference" or input.numel() == 0:
        return reference.conv2d_relu_pool(input, weight, bias, stride, padding, dilation, groups, pool, pool_size,
                                          pool_stride)
    op = _triton.run_conv2d_relu_pool_triton if backend == "triton" else register.run_conv2d_relu_pool
    out, _code = op(input, weight, bias, list(stride), list(padding), list(dilation), groups, pool,
                    list(pool_size), list(pool_stride))
    return out


__all__ = ["POOLS", "ROUTES", "check_conv_relu_pool", "conv2d_relu_pool", "conv_output_elements", "route_mode",
           "runs_stock"]
