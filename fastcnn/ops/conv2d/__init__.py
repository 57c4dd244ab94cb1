"""fastcnn's bias-free convolution for the blocks whose convolution output feeds a BatchNorm (which cancels any
bias): on CPU fastcnn's Winograd F(2x2, 3x3) (csrc/cpu/winograd.cpp) where `winograd_runs`, ATen's elsewhere.

Backends (`ROUTES`): "cpu" (fastcnn::conv2d_winograd, whose backward is Winograd's too: the input gradient and the
weight gradient) on CPU calls in the "winograd" size class; "reference" (``F.conv2d``: oneDNN, cuDNN) everywhere
else. Under a forced backend other than "cpu" the convolution is ATen's, as it is in every other backend's BatchNorm
ops (fastcnn.ops.batch_norm); under autocast it is ``F.conv2d``, which casts as stock does.
"""
import torch

from .._args import pair
from .._dispatch import CPU_RESULTS, Route, RouteTable, autocast_enabled, forced_backend, layout_of, route
from . import reference
from . import register

# Where the CPU convolution is fastcnn's Winograd rather than oneDNN's direct one: the rule of winograd_applies in
# csrc/cpu/winograd.cpp (its measurements are there), mirrored here so that a route can name the class;
# tests/ops/test_winograd.py checks that the two agree.
WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_MIN_TILES = 256  # narrow filters, by blocks of tiles
WINOGRAD_MIN_WORK = 1 << 21  # tiles * C_in * C_out
WINOGRAD_COLUMN_FILTERS = 256 * 256  # C_in * C_out from which filters count as wide: by columns of output channels,
WINOGRAD_COLUMN_TILES = (96, 1024)  # for this many tiles (beyond, by blocks of tiles)
# The weight gradient's further rule (weight_grad_fits in csrc/cpu/winograd_backward.cpp, measured there).
WINOGRAD_WEIGHT_GRAD_MIN_CHANNELS = 128


def winograd_runs(input, weight, stride, padding, dilation, groups, any_layout=False):
    """True where fastcnn's CPU convolution for these arguments is Winograd's (float32 channels_last CPU input, 3x3,
    stride 1, dilation 1, one group, padding <= 2, enough 2x2 output tiles, channels and work); with `any_layout`,
    the rule whatever the input's memory format, as the fused block's forward with a 2x2 max pool applies it
    (winograd_fits in csrc/conv_relu_pool.cpp). The cheapest tests come first: a stock-routed small layer pays for
    this on every call."""
    w_shape = weight.shape
    if (not input.is_cpu or len(w_shape) != 4 or w_shape[0] < WINOGRAD_MIN_CHANNELS
            or w_shape[1] < WINOGRAD_MIN_CHANNELS or w_shape[2] != 3 or w_shape[3] != 3 or groups != 1
            or input.dim() != 4 or input.shape[1] != w_shape[1]
            or input.dtype != torch.float32 or weight.dtype != torch.float32
            or tuple(stride) != (1, 1) or tuple(dilation) != (1, 1)):
        return False
    if not all(isinstance(p, int) and 0 <= p <= 2 for p in padding):
        return False
    out_h, out_w = input.shape[2] + 2 * padding[0] - 2, input.shape[3] + 2 * padding[1] - 2
    if out_h < 1 or out_w < 1:
        return False
    tiles = input.shape[0] * ((out_h + 1) // 2) * ((out_w + 1) // 2)
    filters = w_shape[0] * w_shape[1]
    if filters >= WINOGRAD_COLUMN_FILTERS and tiles <= WINOGRAD_COLUMN_TILES[1]:
        enough = tiles >= WINOGRAD_COLUMN_TILES[0]
    else:
        enough = tiles >= WINOGRAD_MIN_TILES and tiles * filters >= WINOGRAD_MIN_WORK
    return enough and (any_layout or layout_of(input) == "channels_last")


def winograd_weight_grad_runs(input, weight, stride, padding, dilation, groups):
    """True where the weight gradient of fastcnn's CPU convolution for these arguments is Winograd's, whatever the
    input's memory format: `winograd_runs` with at least WINOGRAD_WEIGHT_GRAD_MIN_CHANNELS channels on both
    sides."""
    return (len(weight.shape) == 4 and min(weight.shape[0], weight.shape[1]) >= WINOGRAD_WEIGHT_GRAD_MIN_CHANNELS
            and winograd_runs(input, weight, stride, padding, dilation, groups, any_layout=True))


ROUTES = RouteTable("conv2d", [
    # The conv + BatchNorm (+ ReLU + pool) blocks of VGG-16-BN in channels_last, batch 2, against stock eager: see
    # conv_bn_block.json (blocks 1-5 run Winograd: inference 1.28-1.82x, training 1.35-1.57x).
    Route("cpu", measured=f"{CPU_RESULTS}_conv_bn_block.json#block1-block5", device="cpu", size="winograd"),
], compiled=register.COMPILED_OPS, compiled_backends=("cpu",))


def conv2d(input, weight, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d(input, weight, None, stride, padding, dilation, groups)``, by fastcnn's Winograd where the route
    says so (CPU, `winograd_runs`), else by ``F.conv2d`` itself. Arguments as ``F.conv2d``'s (zero padding; a
    string padding runs ``F.conv2d``).

    Args:
        input: ``(N, C_in, H, W)``.
        weight: ``(C_out, C_in / groups, kH, kW)``.
        stride, padding, dilation, groups: as ``F.conv2d``.

    Shape:
        output ``(N, C_out, H_out, W_out)``, in input's memory format.

    Example:
        >>> conv2d(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), padding=1).shape
        torch.Size([2, 4, 8, 8])
    """
    if (isinstance(padding, str) or not input.is_cpu or forced_backend() not in (None, "cpu")
            or autocast_enabled(input)):
        return reference.conv2d(input, weight, stride, padding, dilation, groups)
    stride, padding, dilation = pair(stride, "stride", 1), pair(padding, "padding", 0), pair(dilation, "dilation", 1)
    if not winograd_runs(input, weight, stride, padding, dilation, groups) \
            or route(ROUTES, input, size="winograd") != "cpu":
        return reference.conv2d(input, weight, stride, padding, dilation, groups)
    return register.run_conv2d_winograd(input, weight, list(padding))


__all__ = ["ROUTES", "WINOGRAD_COLUMN_FILTERS", "WINOGRAD_COLUMN_TILES", "WINOGRAD_MIN_CHANNELS", "WINOGRAD_MIN_TILES",
           "WINOGRAD_MIN_WORK", "WINOGRAD_WEIGHT_GRAD_MIN_CHANNELS", "conv2d", "winograd_runs",
           "winograd_weight_grad_runs"]
