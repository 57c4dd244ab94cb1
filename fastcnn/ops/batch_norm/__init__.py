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

Backends: on CPU tensors "cpu" (C++ kernels of fastcnn._C); on CUDA tensors "cuda" (CUDA kernels of fastcnn._C),
then "triton" (fastcnn.triton_kernels; on CPU tensors only when forced under TRITON_INTERPRET=1); "reference" (plain
PyTorch, differentiated by autograd) everywhere. The compiled backends share one autograd (batch_norm_autograd.py); in
batch_norm_relu_conv2d the convolution is ATen's for every backend.
"""
import torch

from .. import _extension
from ..reference import batch_norm as reference
from . import _backends

# A fastcnn._C built from older sources lacks these ops: the compiled backends are then unavailable for them.
_COMPILED = _extension.LOADED and hasattr(torch.ops.fastcnn, "scale_shift_add_relu")
IMPLEMENTATIONS = {}  # backend -> module with KERNELS (the primitive ops) and TRAINING (the training ops)
if _COMPILED:
    from . import batch_norm_train
    IMPLEMENTATIONS.update(cpu=batch_norm_train, cuda=batch_norm_train)
if _backends.why_unavailable("triton", "cuda") is None:
    from . import batch_norm_triton
    IMPLEMENTATIONS["triton"] = batch_norm_triton

_PREFERENCE = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


def _backend_for(x):
    """(backend name, its module or None for "reference") for a call on x."""
    preference = [b for b in _PREFERENCE.get(x.device.type, ()) if b in IMPLEMENTATIONS]
    backend = _backends.choose(x.device.type, preference)
    if backend in ("cpu", "cuda") and not _COMPILED:
        raise RuntimeError(f"fastcnn: backend {backend!r} was forced but fastcnn._C has no BatchNorm ops (it was "
                           "built from older sources); rebuild it")
    return backend, IMPLEMENTATIONS.get(backend)


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
    return t.to(reference.accumulation_dtype(x.dtype))


def _affine(weight, bias, y):
    """BatchNorm's gamma and beta in y's accumulation dtype (ones and zeros when the BatchNorm has none)."""
    acc = reference.accumulation_dtype(y.dtype)
    gamma = torch.ones(y.shape[1], dtype=acc, device=y.device) if weight is None else _per_channel(weight, y, "weight")
    beta = torch.zeros(y.shape[1], dtype=acc, device=y.device) if bias is None else _per_channel(bias, y, "bias")
    return gamma, beta


def _residual_like(residual, x):
    if residual is None:
        return None
    if residual.shape != x.shape:
        raise ValueError(f"fastcnn: residual must have the input's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    return residual.to(x.dtype).contiguous(memory_format=reference.memory_format_of(x))


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
    out, _mask, mean, var = implementation.TRAINING.batch_norm_add_relu(y, *_affine(weight, bias, y), residual, eps,
                                                                        *_given_stats(stats, y))
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
    op = implementation.TRAINING.batch_norm_relu_conv2d_stats if with_stats else \
        implementation.TRAINING.batch_norm_relu_conv2d
    return tuple(op(y, *_affine(weight, bias, y), conv_weight, *args, eps, *_given_stats(stats, y)))


def _given_stats(stats, y):
    """The (mean, var) given for y, checked and in y's accumulation dtype, or (None, None)."""
    if stats is None:
        return None, None
    mean, var = stats
    return _per_channel(mean, y, "mean").detach(), _per_channel(var, y, "var").detach()


def _check_batch(y):
    if y.numel() // y.shape[1] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {y.size()}")


def _pair(v):
    return [v, v] if isinstance(v, int) else list(v)
