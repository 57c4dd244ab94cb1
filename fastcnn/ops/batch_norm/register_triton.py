"""The Triton backend of the fused BatchNorm ops: the four primitive ops of csrc/fastcnn.cpp (same schemas and
outputs, name suffixed ``_triton``) as torch.library.triton_op's, so torch.compile sees into the kernels, the
training ops built on them (`TRAINING`, see _training.py), and ``fastcnn::conv2d_batch_stats_triton`` (the
convolution with the batch statistics reduced in its epilogue; `CONV_STATS`). Loaded by `load_triton` only where
Triton is installed; the kernels live in fastcnn.triton_kernels.batch_norm."""
from typing import List, Optional, Tuple

import torch
from torch.library import triton_op

from ...triton_kernels import batch_norm as _kernels
from .._args import conv_output_size
from .._dispatch import accumulation_dtype, memory_format_of, wrap_triton
from ..conv_relu_pool.register import allocate_outputs
from ._training import Kernels, composite_conv_stats, define_training_ops, like_input, register_apply_autograd


def _dense(x, name):
    """x laid out densely in its own memory format (the layout of every output), after checking it."""
    if x.dim() != 4 or not x.is_floating_point() or x.numel() == 0:
        raise ValueError(f"fastcnn: {name} must be a non-empty 4-D floating-point tensor, got {x.dim()}-D {x.dtype} "
                         f"of shape {tuple(x.shape)}")
    return x.contiguous(memory_format=memory_format_of(x))


def _like(t, x, name, dtypes=None):
    """t (shaped like x, of x's dtype or one of `dtypes`) in x's layout, or None."""
    if t is None:
        return None
    if t.shape != x.shape or t.dtype not in (dtypes or (x.dtype,)) or t.device != x.device:
        raise ValueError(f"fastcnn: {name} must match input's shape {tuple(x.shape)}, dtype {x.dtype} and device "
                         f"{x.device}, got {tuple(t.shape)} {t.dtype} on {t.device}")
    return t.contiguous(memory_format=memory_format_of(x))


def _per_channel(t, x, name):
    if t is None:
        return None
    acc = accumulation_dtype(x.dtype)
    if t.shape != (x.shape[1],) or t.dtype != acc or t.device != x.device:
        raise ValueError(f"fastcnn: {name} must be a ({x.shape[1]},) {acc} tensor on {x.device}, got "
                         f"{tuple(t.shape)} {t.dtype} on {t.device}")
    return t.contiguous()


def _channels(x):
    return x.new_empty(x.shape[1], dtype=accumulation_dtype(x.dtype))


@triton_op("fastcnn::batch_norm_stats_triton", mutates_args={})
def batch_norm_stats_triton(input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    x = _dense(input, "input")
    mean, var = _channels(x), _channels(x)
    _kernels.batch_norm_stats(x, mean, var, wrap=wrap_triton)
    return mean, var


@triton_op("fastcnn::scale_shift_add_relu_triton", mutates_args={})
def scale_shift_add_relu_triton(input: torch.Tensor, scale: Optional[torch.Tensor], shift: torch.Tensor,
                                residual: Optional[torch.Tensor], save_mask: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    x = _dense(input, "input")
    out = like_input(x)
    mask = like_input(x, torch.uint8) if save_mask else x.new_empty(0, dtype=torch.uint8)
    _kernels.scale_shift_add_relu(x, _per_channel(scale, x, "scale"), _per_channel(shift, x, "shift"),
                               _like(residual, x, "residual"), out, mask, wrap=wrap_triton)
    return out, mask


def _backward_inputs(grad_out, gate, input, mean):
    x = _dense(input, "input")
    return (_like(grad_out, x, "grad_out"), _like(gate, x, "gate", (torch.uint8, x.dtype)), x,
            _per_channel(mean, x, "mean"))


@triton_op("fastcnn::batch_norm_backward_reduce_triton", mutates_args={})
def batch_norm_backward_reduce_triton(grad_out: torch.Tensor, gate: torch.Tensor, input: torch.Tensor,
                                      mean: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    grad_out, gate, x, mean = _backward_inputs(grad_out, gate, input, mean)
    sum_dz, sum_dz_xmu = _channels(x), _channels(x)
    _kernels.batch_norm_backward_reduce(grad_out, gate, x, mean, sum_dz, sum_dz_xmu, wrap=wrap_triton)
    return sum_dz, sum_dz_xmu


@triton_op("fastcnn::batch_norm_backward_elemt_triton", mutates_args={})
def batch_norm_backward_elemt_triton(grad_out: torch.Tensor, gate: torch.Tensor, input: torch.Tensor,
                                     mean: Optional[torch.Tensor], a: torch.Tensor, b: Optional[torch.Tensor],
                                     d: Optional[torch.Tensor], want_dz: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    grad_out, gate, x, mean = _backward_inputs(grad_out, gate, input, mean)
    grad_x = like_input(x)
    dz = like_input(x) if want_dz else x.new_empty(0)
    _kernels.batch_norm_backward_elemt(grad_out, gate, x, mean, _per_channel(a, x, "a"), _per_channel(b, x, "b"),
                                    _per_channel(d, x, "d"), grad_x, dz, wrap=wrap_triton)
    return grad_x, dz


KERNELS = Kernels(stats=batch_norm_stats_triton, apply=scale_shift_add_relu_triton,
                  backward_reduce=batch_norm_backward_reduce_triton, backward_elemt=batch_norm_backward_elemt_triton)
register_apply_autograd("fastcnn::scale_shift_add_relu_triton", KERNELS)


@triton_op("fastcnn::conv2d_batch_stats_triton", mutates_args={})
def conv2d_batch_stats_triton(input: torch.Tensor, weight: torch.Tensor, stride: List[int], padding: List[int],
                              dilation: List[int], groups: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, var): y = conv2d(input, weight) in input's dtype and memory format; mean and biased var of y per
    output channel, float32."""
    size = conv_output_size(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    y, _ = allocate_outputs(input, weight.shape[0], size, "none", None, None)
    mean, var = (input.new_empty(weight.shape[0], dtype=torch.float32) for _ in range(2))  # (outputs may not alias)
    _kernels.conv2d_batch_stats(input, weight, tuple(stride), tuple(padding), tuple(dilation), groups, y, mean, var,
                       wrap=wrap_triton)
    return y, mean, var


def _conv_stats_setup(ctx, inputs, output):
    input, weight, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.mark_non_differentiable(output[1], output[2])


def _conv_stats_backward(ctx, grad_y, _grad_mean, _grad_var):
    # mean and var are non-differentiable: the BatchNorm backward that consumes them re-derives their contribution
    # to grad_y from y itself (_training.py), so only the convolution's own backward remains.
    input, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    need_input, need_weight = ctx.needs_input_grad[:2]
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_y, input, weight, None, stride, padding, dilation, False, [0, 0], groups,
        [need_input, need_weight, False])
    return grad_input, grad_weight, None, None, None, None


torch.library.register_autograd("fastcnn::conv2d_batch_stats_triton", _conv_stats_backward,
                                setup_context=_conv_stats_setup)

_aten_conv_stats = composite_conv_stats(KERNELS)


def CONV_STATS(x, conv_weight, stride, padding, dilation, groups):  # noqa: N802 (a backend constant, as KERNELS)
    """(y, mean, var): conv2d and the batch statistics of its output, reduced in the epilogue of the Triton
    convolution, which takes every dtype but float64 (that runs ATen's convolution, then the statistics kernels)."""
    if x.dtype == torch.float64:
        return _aten_conv_stats(x, conv_weight, stride, padding, dilation, groups)
    return conv2d_batch_stats_triton(x, conv_weight, stride, padding, dilation, groups)


TRAINING = define_training_ops("_triton", KERNELS, CONV_STATS)
