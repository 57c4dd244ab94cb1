"""fastcnn's fused ConvTranspose2d + bias + activation: argument checks, the public function and its route table.

Backends, in the order tried (`ROUTES`): on CUDA tensors "cuda" (one cuBLAS GEMM + fastcnn's strided phase store with
the bias and ReLU when kernel == stride, else cuDNN + fastcnn's bias/ReLU epilogue; the C++ stride-phase split of that
case is routed nowhere until measured faster, see csrc/conv_transpose.cpp), then "triton" (stride-phase implicit-GEMM
forward, strided-convolution backward with the ReLU mask applied on load); on CPU tensors "cpu" (the C++ paths with
oneDNN); "reference" (plain PyTorch) everywhere.
The CUDA order is provisional until timed on a GPU (see benchmarks/bench_conv_transpose.py).
"""
from .._args import check_float_tensors, check_same_device_and_dtype, pair
from .._dispatch import CPU_RESULTS, STOCK, Route, RouteTable, autocast, call_mode, load_triton, route, stock_routable
from . import reference
from . import register  # noqa: F401  (fakes and autograd of the C++ ops, when fastcnn._C has them)
from .reference import ACTIVATIONS, output_size

_triton, _TRITON_WHY_NOT = load_triton(".register_triton", __name__)

# Output elements (N * C_out * H_out * W_out) below which a call is "small", by (kernel == stride, mode): where on CPU
# fastcnn's fixed per-call cost (its autograd node, the epilogue pass in backward) outweighs what it saves.
SMALL_OUTPUT = {(True, "infer"): 1 << 17, (True, "train"): 1 << 18, (False, "infer"): 1 << 21,
                (False, "train"): 1 << 20}


def _size_class(input, weight, stride, groups, mode):
    """"small" or "large" by the output's elements (taken as ``N * C_out * H * stride * W * stride``) against
    `SMALL_OUTPUT` of the call's kind (one GEMM where kernel == stride) and mode."""
    n, _, h, w = input.shape
    _, c_out, kh, kw = weight.shape
    out = n * c_out * groups * h * stride[0] * w * stride[1]
    gemm = kh == stride[0] and kw == stride[1]
    return "small" if out < SMALL_OUTPUT[gemm, mode] else "large"


ROUTES = RouteTable("conv_transpose2d_act", [
    Route("cuda", device="cuda"),
    Route("triton", device="cuda"),
    # CPU, fp32, stock / fastcnn[cpu] in paired rounds (conv_transpose_sweep.json: NCHW, batch 2). Small calls lose
    # to the op's fixed cost per call: kernel == stride 0.87-0.97x forward below 131k output elements, 0.85-0.99x
    # forward+backward below 262k; kernel != stride (oneDNN, then the ReLU: nothing fused to win in forward)
    # 0.79-0.98x forward up to 800k, 0.86-1.02x forward+backward. So stock runs there (routed: 0.99-1.04x).
    Route(STOCK, measured=f"{CPU_RESULTS}_conv_transpose_sweep.json#k2s2 128->128 @2-k4s2p1 64->32 @56",
          device="cpu", size="small"),
    # Above: forward 1.26-2.76x, forward+backward 1.12-1.57x (the sweep); U-Net decoder shapes at batch 2,
    # channels_last (conv_transpose.json): forward 1.04-1.24x, forward+backward 1.17-1.96x (k2s2 and k4s2p1).
    Route("cpu", measured=f"{CPU_RESULTS}_conv_transpose.json#k2s2,k4s2p1", device="cpu"),
], compiled=register.COMPILED_OPS, triton=_TRITON_WHY_NOT, no_float64=("triton",))


def runs_stock(input, weight, bias, stride, groups):
    """True where `ROUTES` sends a call on tensor `input` to stock PyTorch (outside autocast, under which the op routes
    on the cast dtype): the fused module then runs as nn.ConvTranspose2d and its ReLU, without the op's argument
    layer (stock's own checks apply)."""
    if not stock_routable(input):
        return False
    mode = call_mode(input, weight, bias)
    return ROUTES.choose(input, mode, _size_class(input, weight, stride, groups, mode)) == STOCK


def check_conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation, activation):
    """Validates one call; returns the normalized (stride, padding, output_padding, dilation, activation)."""
    check_float_tensors(input=input, weight=weight)
    if input.dim() != 4:
        raise ValueError(f"fastcnn: input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"fastcnn: weight must be 4-D (C_in, C_out / groups, kH, kW), got shape "
                         f"{tuple(weight.shape)}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"fastcnn: groups must be a positive int, got {groups!r}")
    if weight.shape[0] % groups != 0:
        raise ValueError(f"fastcnn: weight's {weight.shape[0]} input channels are not divisible by groups={groups}")
    if input.shape[1] != weight.shape[0]:
        raise ValueError(f"fastcnn: input has {input.shape[1]} channels, but weight of shape {tuple(weight.shape)} "
                         f"expects {weight.shape[0]}")
    c_out = weight.shape[1] * groups
    check_same_device_and_dtype(input, weight=weight, bias=bias)
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"fastcnn: bias must have shape ({c_out},), got {tuple(bias.shape)}")
    stride, padding = pair(stride, "stride", 1), pair(padding, "padding", 0)
    dilation, output_padding = pair(dilation, "dilation", 1), pair(output_padding, "output_padding", 0)
    for i in range(2):
        if output_padding[i] >= max(stride[i], dilation[i]):
            raise ValueError(f"fastcnn: output_padding {output_padding} must be smaller than stride {stride} or "
                             f"dilation {dilation} in each dimension")
    size = output_size(input.shape[2:], weight.shape[2:], stride, padding, output_padding, dilation)
    if min(size) < 1:
        raise ValueError(f"fastcnn: input of spatial size {tuple(input.shape[2:])} gives an empty output {size}: "
                         f"padding {padding} is too large for kernel {tuple(weight.shape[2:])}")
    activation = "none" if activation is None else activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"fastcnn: activation must be None, 'none' or 'relu', got {activation!r}")
    return stride, padding, output_padding, dilation, activation


def conv_transpose2d_act(input, weight, bias, stride, padding, output_padding, groups, dilation, activation):
    """``act(conv_transpose2d(input, weight, bias, ...))``; see fastcnn.functional.conv_transpose2d for the contract.

    Example:
        >>> conv_transpose2d_act(torch.randn(2, 8, 7, 7), torch.randn(8, 4, 4, 4), None, 2, 1, 0, 1, 1, "relu").shape
        torch.Size([2, 4, 14, 14])
    """
    input, weight, bias = autocast(input, weight, bias)
    stride, padding, output_padding, dilation, activation = check_conv_transpose(
        input, weight, bias, stride, padding, output_padding, groups, dilation, activation)
    mode = call_mode(input, weight, bias)
    backend = route(ROUTES, input, mode, _size_class(input, weight, stride, groups, mode))
    if backend == "reference" or input.numel() == 0:
        return reference.conv_transpose2d_act(input, weight, bias, stride, padding, output_padding, groups,
                                              dilation, activation)
    op = _triton.run_conv_transpose2d_act_triton if backend == "triton" else register.run_conv_transpose2d_act
    return op(input, weight, bias, list(stride), list(padding), list(output_padding), groups, list(dilation),
              activation)


__all__ = ["ACTIVATIONS", "ROUTES", "SMALL_OUTPUT", "call_mode", "check_conv_transpose", "conv_transpose2d_act",
           "output_size", "runs_stock"]
