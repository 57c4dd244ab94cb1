"""fastcnn's fused BatchNorm pieces for the residual blocks: argument checks, then the backend that runs the call.

* ``scale_shift_add_relu(x, scale, shift, residual)`` -> ``relu(x * scale + shift + residual)`` in one pass (the
  eval-mode epilogue, BatchNorm folded into scale/shift); saves a uint8 ReLU mask for backward.
* ``batch_norm_add_relu(y, weight, bias, eps, residual)`` -> ``(relu(batch_norm(y) + residual), mean, var)`` with
  training-mode BatchNorm: one statistics reduction and one normalise + add + ReLU pass.
* ``batch_norm_relu_conv2d(y, weight, bias, eps, conv_weight, ...)`` -> ``(conv2d(relu(batch_norm(y))), mean, var)``:
  BN-apply + ReLU fused into the next convolution's input, recomputed in backward instead of stored.

``mean`` and ``var`` (biased) are the batch statistics, for the running-statistics update.
``batch_norm_relu_conv2d_stats(...)`` also returns the batch statistics of its output, for the BatchNorm after it.

``stats=(mean, var)``: the batch statistics of ``y`` when its producer already reduced them (conv2d_batch_stats,
batch_norm_relu_conv2d_stats), so they are not reduced again. They must be exactly ``y``'s statistics: the
compiled backends' backward re-derives their gradient from ``y``, and the reference recomputes them from ``y``
(to differentiate through them) and ignores the given ones.

``batch_norm_relu_pool(y, y_bias, weight, bias, eps, pool, ...)`` -> ``(pool(relu(batch_norm(y + y_bias))), mean,
var)`` saving only the pooled output; ``conv2d_batch_stats(x, w, ...)`` -> ``(conv2d(x, w), mean, var)`` and
``conv2d_epilogue_stats(x, w, ...)`` -> ``(conv2d(x, w), (mean, var) or None)``, the statistics of a convolution
output for the BatchNorm after it.

Backends, in the order tried (`ROUTES`, one table for the residual blocks' ops and conv2d_batch_stats): on CPU
tensors "cpu" (C++ kernels of fastcnn._C); on CUDA tensors "cuda" (CUDA kernels of fastcnn._C), then "triton"
(fastcnn.triton_kernels; on CPU tensors only when forced under TRITON_INTERPRET=1); "reference" (plain PyTorch,
differentiated by autograd) everywhere. The compiled backends share one autograd (_training.py); in
batch_norm_relu_conv2d the convolution is ATen's for every backend. ``batch_norm_relu_pool`` has its own table
(`POOL_ROUTES`: cpu, cuda; no Triton kernel).
"""
import torch
import torch.nn.functional as F

from .._args import pair
from .._dispatch import (
    CPU_RESULTS,
    Route,
    RouteTable,
    accumulation_dtype,
    autocast,
    load_triton,
    memory_format_of,
    route,
)
from . import reference
from . import register
from ..conv_relu_pool import check_conv_relu_pool

_triton, _TRITON_WHY_NOT = load_triton(".register_triton", __name__)

ROUTES = RouteTable("batch_norm", [
    Route("cuda", device="cuda"),
    Route("triton", device="cuda"),
    # CPU, fp32 channels_last, batch 2, stock / fastcnn interleaved: the VGG-16-BN Conv+BN+ReLU+pool blocks 1-5
    # (their convolution Winograd's, fastcnn.ops.conv2d) train 1.35-1.57x and infer 1.28-1.82x; the residual and
    # Inception blocks, which also run these ops, lose as a whole and run their stock layers on CPU (their module
    # routes).
    Route("cpu", measured=f"{CPU_RESULTS}_conv_bn_block.json#block1-block5", device="cpu"),
], compiled=register.COMPILED_OPS, triton=_TRITON_WHY_NOT)


def implementation(backend):
    """The module whose KERNELS (the primitive ops), TRAINING (the training ops) and CONV_STATS run on `backend`."""
    return _triton if backend == "triton" else register


def _backend_for(x):
    """(backend name, its implementation or None for "reference") for a call on x."""
    backend = route(ROUTES, x)
    return backend, None if backend == "reference" else implementation(backend)


def _check_input(x, name="input"):
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = f"{x.dim()}-D {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"fastcnn: {name} must be a 4-D (N, C, H, W) floating-point tensor, got {got}")
    if x.numel() == 0:
        raise ValueError(f"fastcnn: {name} must not be empty, got shape {tuple(x.shape)}")


def _per_channel(t, x, name):
    """t as a (C,) tensor in x's accumulation dtype (differentiably), or None."""
    if t is None:
        return None
    if t.shape != (x.shape[1],):
        raise ValueError(f"fastcnn: {name} must have shape ({x.shape[1]},) (one value per channel of the input), "
                         f"got {tuple(t.shape)}")
    return t.to(accumulation_dtype(x.dtype))


def _affine(weight, bias, y):
    """BatchNorm's gamma and beta in y's accumulation dtype (ones and zeros when the BatchNorm has none)."""
    acc = accumulation_dtype(y.dtype)
    gamma = torch.ones(y.shape[1], dtype=acc, device=y.device) if weight is None else _per_channel(weight, y, "weight")
    beta = torch.zeros(y.shape[1], dtype=acc, device=y.device) if bias is None else _per_channel(bias, y, "bias")
    return gamma, beta


def _residual_like(residual, x):
    if residual is None:
        return None
    if residual.shape != x.shape:
        raise ValueError(f"fastcnn: residual must have the input's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    return residual.to(x.dtype).contiguous(memory_format=memory_format_of(x))


def scale_shift_add_relu(x, scale, shift, residual=None):
    """``relu(x * scale[c] + shift[c] + residual)``; ``scale=None`` means 1, ``residual=None`` means 0."""
    _check_input(x)
    scale, shift = _per_channel(scale, x, "scale"), _per_channel(shift, x, "shift")
    if shift is None:
        raise ValueError("fastcnn: shift is required")
    residual = _residual_like(residual, x)
    save_mask = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, scale, shift, residual))
    backend, implementation = _backend_for(x)
    if backend == "reference":
        return reference.scale_shift_add_relu(x, scale, shift, residual, save_mask)[0]
    return implementation.KERNELS.apply(x, scale, shift, residual, save_mask)[0]


def batch_norm_add_relu(y, weight, bias, eps, residual=None, stats=None):
    """Training-mode ``relu(batch_norm(y, weight, bias, eps) + residual)``; returns ``(out, mean, var)``."""
    _check_input(y, "y")
    _check_batch(y)
    residual = _residual_like(residual, y)
    backend, implementation = _backend_for(y)
    if backend == "reference":
        return reference.batch_norm_add_relu(y, weight, bias, eps, residual)
    out, _mask, mean, var = implementation.TRAINING.run.batch_norm_add_relu(y, *_affine(weight, bias, y), residual,
                                                                            eps, *_given_stats(stats, y))
    return out, mean, var


def batch_norm_relu_conv2d(y, weight, bias, eps, conv_weight, stride=1, padding=0, dilation=1, groups=1, stats=None):
    """``conv2d(relu(batch_norm(y, weight, bias, eps)), conv_weight, None, stride, padding, dilation, groups)`` with
    training-mode BatchNorm; returns ``(out, mean, var)``."""
    return _norm_relu_conv2d(False, y, weight, bias, eps, conv_weight, stride, padding, dilation, groups, stats)


def batch_norm_relu_conv2d_stats(y, weight, bias, eps, conv_weight, stride=1, padding=0, dilation=1, groups=1,
                                 stats=None):
    """`batch_norm_relu_conv2d` that also returns the batch statistics of its output (not differentiable; reduced in
    the convolution's epilogue on the triton backend): ``(out, mean, var, out_mean, out_var)``."""
    return _norm_relu_conv2d(True, y, weight, bias, eps, conv_weight, stride, padding, dilation, groups, stats)


def _norm_relu_conv2d(with_stats, y, weight, bias, eps, conv_weight, stride, padding, dilation, groups, stats):
    _check_input(y, "y")
    _check_batch(y)
    conv_weight = conv_weight.to(y.dtype)
    args = (_pair(stride), _pair(padding), _pair(dilation), groups)
    backend, implementation = _backend_for(y)
    if backend == "reference":
        out, mean, var = reference.batch_norm_relu_conv2d(y, weight, bias, eps, conv_weight, *args)
        return (out, mean, var, *reference.batch_norm_stats(out.detach())) if with_stats else (out, mean, var)
    run = implementation.TRAINING.run
    op = run.batch_norm_relu_conv2d_stats if with_stats else run.batch_norm_relu_conv2d
    return tuple(op(y, *_affine(weight, bias, y), conv_weight, *args, eps, *_given_stats(stats, y)))


def _given_stats(stats, y):
    """The (mean, var) given for y, checked and in y's accumulation dtype, or (None, None)."""
    if stats is None:
        return None, None
    mean, var = stats
    return _per_channel(mean, y, "mean").detach(), _per_channel(var, y, "var").detach()


def update_running_statistics(running_mean, running_var, mean, var, factor, count):
    """In place, without autograd: ``running = running * (1 - factor) + batch * factor`` for the mean and for the
    unbiased variance ``var * count / (count - 1)`` (``count``: values per channel, N*H*W), each operation rounded in
    the buffers' dtype (float32 buffers: float32; float64 buffers keep float64 precision). Eagerly on float32/float64
    buffers of the statistics' dtype and device, one fastcnn._C call (the same bits); else these tensor ops."""
    running, batch = (running_mean, running_var), (mean, var)
    with torch.no_grad():
        if (register.UPDATE_RUNNING is not None and not torch.compiler.is_compiling()
                and running_mean.dtype == running_var.dtype == mean.dtype == var.dtype
                and mean.dtype in (torch.float32, torch.float64) and running_mean.device.type in ("cpu", "cuda")
                and running_mean.device == mean.device and running_mean.is_contiguous()
                and running_var.is_contiguous()):
            register.UPDATE_RUNNING(running_mean, running_var, mean, var, factor, count)
            return
        batch = (mean, var * (count / (count - 1)))
        for r, b in zip(running, batch):
            acc = torch.promote_types(r.dtype, torch.float32)  # float64 buffers keep float64 precision
            r.copy_(r.to(acc) * (1 - factor) + b.to(acc) * factor)


def _check_batch(y):
    if y.numel() // y.shape[1] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {y.size()}")


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)



POOL_ROUTES = RouteTable("batch_norm_relu_pool", [
    Route("cuda", device="cuda"),
    Route("cpu", measured=f"{CPU_RESULTS}_conv_bn_block.json#block1-block5", device="cpu"),
], compiled=register.POOL_OPS)


def _check_pool_input(y, y_bias, weight, bias):
    if not isinstance(y, torch.Tensor) or y.dim() != 4:
        got = f"{y.dim()}D input" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"fastcnn: expected 4D input (got {got})")
    if not y.is_floating_point():
        raise TypeError(f"fastcnn: input must be a floating-point tensor, got {y.dtype}")
    if y.numel() // y.shape[1] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {y.size()}")
    for name, t in (("y_bias", y_bias), ("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (y.shape[1],):
            raise ValueError(f"fastcnn: {name} must have shape ({y.shape[1]},) (one value per channel of the input), "
                             f"got {tuple(t.shape)}")


def batch_norm_relu_pool(y, y_bias, weight, bias, eps, pool="none", pool_size=2, pool_stride=None):
    """``(pool(relu(batch_norm(y + y_bias, weight, bias, eps))), mean, var)`` with training-mode BatchNorm on a
    convolution output ``y`` computed without its bias ``y_bias``. ``y_bias``, ``weight`` and ``bias`` may be None;
    pool is ``"max"``, ``"avg"`` or ``"none"``. ``mean`` and ``var`` (biased) are the batch statistics of
    ``y + y_bias``, for the running-statistics update.

    BatchNorm cancels a per-channel constant (``u - mean(u) = y - mean(y)`` for ``u = y + b``), so the output never
    depends on ``y_bias`` (its gradient is exactly zero) and the compiled backends skip the bias add: one statistics
    reduction, then ONE pass of the fused epilogue ``fastcnn::bias_relu_pool(y, shift, ..., scale)`` writing
    ``pool(relu(y * scale + shift))`` (rounded once, as stock BatchNorm's output is) and a uint8 code per pooled
    element. Saved for backward: ``y``, the pooled output and the code; the backward rebuilds the gradient at
    ``z = y * scale + shift`` and runs BatchNorm's backward kernels (register.py)."""
    _check_pool_input(y, y_bias, weight, bias)
    if pool == "none":
        pool_size = pool_stride = (1, 1)
    else:
        pool_size = pair(pool_size, "pool_size", 1)
        pool_stride = pool_size if pool_stride is None else pair(pool_stride, "pool_stride", 1)
    if route(POOL_ROUTES, y) == "reference":
        return reference.batch_norm_relu_pool(y, y_bias, weight, bias, eps, pool, pool_size, pool_stride)
    acc = accumulation_dtype(y.dtype)
    gamma = torch.ones(y.shape[1], dtype=acc, device=y.device) if weight is None else weight.to(acc)
    beta = torch.zeros(y.shape[1], dtype=acc, device=y.device) if bias is None else bias.to(acc)
    out, _code, mean, var = register.batch_norm_relu_pool(y, y_bias, gamma, beta, eps, pool, list(pool_size),
                                                          list(pool_stride))
    if y_bias is not None:
        mean = mean + y_bias.detach().to(acc)
    return out, mean, var


def conv2d_batch_stats(input, weight, stride=1, padding=0, dilation=1, groups=1):
    """``y = conv2d(input, weight, None, stride, padding, dilation, groups)`` and the per-channel batch statistics
    of ``y`` as BatchNorm2d computes them in training. "triton" reduces them in the convolution's epilogue (y is
    never read back; float64 runs ATen's convolution and the Triton statistics kernels); "cpu" and "cuda" run ATen's
    convolution (oneDNN/cuDNN, whose epilogue fastcnn cannot extend), then fastcnn's statistics op.

    Args:
        input: ``(N, C_in, H, W)`` float32, float16, bfloat16 or float64, NCHW or channels_last.
        weight: ``(C_out, C_in / groups, kH, kW)``, input's dtype.
        stride, padding, dilation: int or pair of ints, as in ``nn.Conv2d`` (zero padding).
        groups: int.

    Returns:
        ``(y, mean, var)``: y in input's dtype and memory format (differentiable); mean and biased var of y's values
        as stored (rounded to y's dtype), float32 (float64 for float64 input), not differentiable: the BatchNorm
        that takes them re-derives their gradient from y.

    Shape:
        y: ``(N, C_out, H_out, W_out)``; mean, var: ``(C_out,)``.

    Example:
        >>> y, mean, var = conv2d_batch_stats(torch.randn(2, 3, 7, 5), torch.randn(5, 3, 3, 3), padding=1)
        >>> y.shape, mean.shape
        (torch.Size([2, 5, 7, 5]), torch.Size([5]))
    """
    stride, padding, dilation, _, _ = check_conv_relu_pool(input, weight, None, stride, padding, dilation, groups,
                                                           "none", 1, None)
    input, weight = autocast(input, weight)
    if input.shape[0] * weight.shape[0] == 0:
        raise ValueError(f"fastcnn: input of shape {tuple(input.shape)} and weight of shape {tuple(weight.shape)} "
                         "give an empty output, which has no batch statistics")
    args = (list(stride), list(padding), list(dilation), groups)
    backend = route(ROUTES, input)
    if backend == "reference":
        return reference.conv2d_batch_stats(input, weight, *args)
    return tuple(implementation(backend).CONV_STATS(input, weight, *args))


def conv2d_epilogue_stats(input, weight, stride=1, padding=0, dilation=1, groups=1):
    """``(conv2d(input, weight, None, ...), stats)``: stats is the output's batch statistics ``(mean, var)`` where
    the backend reduces them in the convolution's epilogue (triton), else None - the BatchNorm op that follows then
    reduces them itself, since a separate pass costs the same wherever it runs."""
    if route(ROUTES, input) != "triton":
        return F.conv2d(input, weight, None, stride, padding, dilation, groups), None
    y, mean, var = conv2d_batch_stats(input, weight, stride, padding, dilation, groups)
    return y, (mean, var)


def batch_norm_relu_conv2d_epilogue_stats(y, weight, bias, eps, conv_weight, stride=1, padding=0, dilation=1,
                                          groups=1, stats=None):
    """`batch_norm_relu_conv2d` returning ``(out, mean, var, out_stats)``: out_stats as `conv2d_epilogue_stats`
    gives them (the output's batch statistics where the convolution's epilogue reduces them, else None)."""
    if route(ROUTES, y) != "triton":
        return (*batch_norm_relu_conv2d(y, weight, bias, eps, conv_weight, stride, padding, dilation, groups), None)
    out, mean, var, out_mean, out_var = batch_norm_relu_conv2d_stats(y, weight, bias, eps, conv_weight, stride,
                                                                     padding, dilation, groups, stats)
    return out, mean, var, (out_mean, out_var)


__all__ = ["POOL_ROUTES", "ROUTES", "batch_norm_add_relu", "batch_norm_relu_conv2d",
           "batch_norm_relu_conv2d_epilogue_stats", "batch_norm_relu_conv2d_stats", "batch_norm_relu_pool",
           "conv2d_batch_stats", "conv2d_epilogue_stats", "implementation", "scale_shift_add_relu",
           "update_running_statistics"]
