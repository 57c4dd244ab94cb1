"""Training-mode BatchNorm + ReLU (+ max/avg pool) on a convolution output, saving only the pooled output.

``batch_norm_relu_pool(y, y_bias, weight, bias, eps, pool, pool_size, pool_stride)`` -> ``(out, mean, var)`` with
``out = pool(relu(batch_norm(y + y_bias)))``, BatchNorm on the batch statistics. ``mean`` and ``var`` (biased) are
the batch statistics of ``y + y_bias``, for the running-statistics update.

``y`` is a convolution computed without its bias and ``y_bias`` that bias (or None). BatchNorm cancels a per-channel
constant: with ``u = y + b``, ``mean(u) = mean(y) + b``, ``var(u) = var(y)``, so ``u - mean(u) = y - mean(y)``. The
output therefore never depends on ``b`` (its gradient is exactly zero) and ``b`` only moves the returned mean. The
bias add, a full pass over the convolution output, is skipped.

Compiled backends ("cpu", "cuda": kernels of fastcnn._C), with ``M = N*H*W`` values per channel:

* forward: per-channel ``mean, var`` (one deterministic reduction), ``scale = gamma * rsqrt(var + eps)``,
  ``shift = beta - mean * scale``; then ONE pass of the fused epilogue ``fastcnn::bias_relu_pool(y, shift, ...,
  scale)`` computes ``z = y * scale + shift`` in the accumulation dtype, rounds it once (as stock BatchNorm's output
  is), and writes ``pool(relu(z))`` and one uint8 code per pooled element. Saved for backward: ``y``, the pooled
  output and the code - not ``z``, not ``relu(z)``, not the pool indices.
* backward: the epilogue backward rebuilds ``dz`` (the gradient at ``z``, ReLU and pool routed) at full resolution,
  then BatchNorm's backward with the saved ``y``: ``grad_y = gamma * invstd * (dz - sum dz / M
  - (y - mean) * invstd^2 * sum(dz * (y - mean)) / M)``, ``grad_gamma = invstd * sum(dz * (y - mean))``,
  ``grad_beta = sum dz`` (fastcnn's BatchNorm backward reduce + elementwise kernels).

"reference" (plain PyTorch, differentiated by autograd) runs everywhere. There is no Triton kernel for it.
"""
import torch

from .. import _extension
from ..reference import batch_norm_relu_pool as reference
from ..reference.batch_norm import accumulation_dtype
from . import _backends
from ._args import pair

# A fastcnn._C built from older sources may lack the BatchNorm kernels: the compiled backends are then unavailable.
_COMPILED = _extension.LOADED and hasattr(torch.ops.fastcnn, "batch_norm_stats")
if _COMPILED:
    from .batch_norm_relu_pool_cpp import batch_norm_relu_pool as _batch_norm_relu_pool


def _backend_for(y):
    device_type = y.device.type
    backend = _backends.choose(device_type, (device_type,) if _COMPILED and device_type in ("cpu", "cuda") else ())
    if backend == "triton":
        raise RuntimeError("fastcnn: training-mode BatchNorm + ReLU + pool has no triton backend; use cuda, cpu or "
                           "reference")
    if backend in ("cpu", "cuda") and not _COMPILED:
        raise RuntimeError(f"fastcnn: backend {backend!r} was forced but fastcnn._C has no BatchNorm ops (it was "
                           "built from older sources); rebuild it")
    return backend


def _check(y, y_bias, weight, bias):
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
    """``(pool(relu(batch_norm(y + y_bias, weight, bias, eps))), mean, var)`` with training-mode BatchNorm; see the
    module docstring. ``y_bias``, ``weight`` and ``bias`` may be None; pool is ``"max"``, ``"avg"`` or ``"none"``."""
    _check(y, y_bias, weight, bias)
    if pool == "none":
        pool_size = pool_stride = (1, 1)
    else:
        pool_size = pair(pool_size, "pool_size", 1)
        pool_stride = pool_size if pool_stride is None else pair(pool_stride, "pool_stride", 1)
    if _backend_for(y) == "reference":
        return reference.batch_norm_relu_pool(y, y_bias, weight, bias, eps, pool, pool_size, pool_stride)
    acc = accumulation_dtype(y.dtype)
    gamma = torch.ones(y.shape[1], dtype=acc, device=y.device) if weight is None else weight.to(acc)
    beta = torch.zeros(y.shape[1], dtype=acc, device=y.device) if bias is None else bias.to(acc)
    out, _code, mean, var = _batch_norm_relu_pool(y, y_bias, gamma, beta, eps, pool, list(pool_size),
                                                  list(pool_stride))
    if y_bias is not None:
        mean = mean + y_bias.detach().to(acc)
    return out, mean, var
