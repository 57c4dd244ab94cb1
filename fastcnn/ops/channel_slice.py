"""Concatenation without a concatenation copy, for Inception-style blocks: each branch's last stage (normalise +
ReLU) stores straight into its channel slice of the block output (math in fastcnn/reference/channel_slice.py).

* ``scale_shift_relu_out(x, scale, shift, out)``: the op ``fastcnn::scale_shift_relu_out`` - ``relu(x * scale +
  shift)`` written into ``out``, a tensor of x's shape with any strides (a channel slice of the output).
* ``concat_branches(branches, memory_format)``: allocates the concatenated output once and fills every slice, as
  one autograd Function. Its backward hands each branch the gradient slice (a view of the output gradient) gated by
  the branch's slice of the output itself (``out > 0`` is ReLU's mask, so nothing extra is saved), then runs
  BatchNorm's backward (training) or the affine map's (eval) with the existing fused BatchNorm ops.

Backends: on CPU tensors "cpu", on CUDA tensors "cuda" (kernels of fastcnn._C); "reference" (plain PyTorch,
differentiated by autograd) everywhere.
"""
from typing import NamedTuple, Optional

import torch

from .. import _extension
from ..reference import channel_slice as reference
from ..reference.batch_norm import accumulation_dtype
from . import _backends
from . import batch_norm as _batch_norm_ops  # noqa: F401  (registers the BatchNorm ops' fakes and autograd)

# Needs this op and the BatchNorm ops; a fastcnn._C built from older sources lacks them.
_COMPILED = _extension.LOADED and all(hasattr(torch.ops.fastcnn, op) for op in (
    "scale_shift_relu_out", "scale_shift_add_relu"))
if _COMPILED:
    from .batch_norm_train import batch_norm_relu_backward

    @torch.library.register_fake("fastcnn::scale_shift_relu_out")
    def _store_fake(input, scale, shift, out):
        return None

_PREFERENCE = {"cuda": ("cuda",), "cpu": ("cpu",)} if _COMPILED else {}


class BranchEpilogue(NamedTuple):
    """One branch's last stage, ``relu(norm(input))``, stored into its channel slice.

    ``eps`` None: ``norm`` is the affine map ``input * weight + bias`` (``weight`` None means 1) - an eval-mode
    BatchNorm, or a BatchNorm folded into the convolution before it (then only the shift remains). ``eps`` a float:
    training-mode BatchNorm with the batch statistics of ``input``, ``gamma = weight`` and ``beta = bias`` (None: 1
    and 0).
    """
    input: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: Optional[float] = None


def _backend_for(x):
    backend = _backends.choose(x.device.type, _PREFERENCE.get(x.device.type, ()))
    if backend == "triton":
        raise RuntimeError("fastcnn: concat_branches / scale_shift_relu_out have no triton backend; use cuda, cpu "
                           "or reference")
    if backend in ("cpu", "cuda") and not _COMPILED:
        raise RuntimeError(f"fastcnn: backend {backend!r} was forced but fastcnn._C has no scale_shift_relu_out op "
                           "(it was built from older sources); rebuild it")
    return backend


def _check_per_channel(t, x, name):
    if t is not None and t.shape != (x.shape[1],):
        raise ValueError(f"fastcnn: {name} must have shape ({x.shape[1]},) (one value per channel of the input), "
                         f"got {tuple(t.shape)}")


def _check_input(x, name):
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = f"{x.dim()}-D {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"fastcnn: {name} must be a 4-D (N, C, H, W) floating-point tensor, got {got}")


def scale_shift_relu_out(x, scale, shift, out):
    """Writes ``relu(x * scale[c] + shift[c])`` into ``out`` (scale None: 1); ``out`` may be any strided view of
    x's shape and dtype, e.g. ``big.narrow(1, offset, C)``. Not differentiable (it is the store; see
    ``concat_branches`` for the differentiable concatenation)."""
    _check_input(x, "input")
    if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        got = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"fastcnn: out must have input's shape, dtype and device ({tuple(x.shape)} {x.dtype} on "
                         f"{x.device}), got {got}")
    if shift is None:
        raise ValueError("fastcnn: shift is required")
    _check_per_channel(scale, x, "scale")
    _check_per_channel(shift, x, "shift")
    acc = accumulation_dtype(x.dtype)
    scale = None if scale is None else scale.to(acc)
    if _backend_for(x) == "reference":
        return reference.scale_shift_relu_out(x, scale, shift.to(acc), out)
    torch.ops.fastcnn.scale_shift_relu_out(x, scale, shift.to(acc), out)


def _check_branches(branches):
    if not branches:
        raise ValueError("fastcnn: concat_branches needs at least one branch")
    first = branches[0].input
    for i, branch in enumerate(branches):
        y = branch.input
        _check_input(y, f"branches[{i}].input")
        if (y.shape[0], *y.shape[2:]) != (first.shape[0], *first.shape[2:]) or y.dtype != first.dtype \
                or y.device != first.device:
            raise ValueError(f"fastcnn: every branch must have branches[0]'s batch size, spatial size, dtype and "
                             f"device ({first.shape[0]}, *, {tuple(first.shape[2:])}, {first.dtype}, {first.device})"
                             f"; branches[{i}] has {tuple(y.shape)}, {y.dtype}, {y.device}")
        _check_per_channel(branch.weight, y, f"branches[{i}].weight")
        _check_per_channel(branch.bias, y, f"branches[{i}].bias")
        if branch.eps is None and branch.bias is None:
            raise ValueError(f"fastcnn: branches[{i}].bias (the shift) is required for an affine branch")
        if branch.eps is not None and y.numel() // y.shape[1] == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {y.size()}")


def _in_accumulation_dtype(branch):
    """weight and bias in the input's accumulation dtype (differentiably); a BatchNorm without affine parameters
    gets gamma = 1 and beta = 0."""
    y, weight, bias, eps = branch
    acc = accumulation_dtype(y.dtype)
    if eps is not None:
        weight = torch.ones(y.shape[1], dtype=acc, device=y.device) if weight is None else weight
        bias = torch.zeros(y.shape[1], dtype=acc, device=y.device) if bias is None else bias
    return BranchEpilogue(y, None if weight is None else weight.to(acc), bias.to(acc), eps)


def _store_all(branches, memory_format):
    """(out, [(mean, var) or None per branch]): out allocated once, each branch stored into its slice."""
    out = reference.empty_concatenation([b.input for b in branches], memory_format)
    stats, offset = [], 0
    for y, weight, bias, eps in branches:
        scale, shift, pair = weight, bias, None
        if eps is not None:  # training-mode BatchNorm: scale = gamma / sqrt(var + eps), shift = beta - mean * scale
            mean, var = torch.ops.fastcnn.batch_norm_stats(y)
            scale = weight * torch.rsqrt(var + eps)
            shift, pair = bias - mean * scale, (mean, var)
        torch.ops.fastcnn.scale_shift_relu_out(y, scale, shift, out.narrow(1, offset, y.shape[1]))
        stats.append(pair)
        offset += y.shape[1]
    return out, stats


class _ConcatBranches(torch.autograd.Function):
    """(eps per branch, memory_format, y_1, weight_1, bias_1, y_2, ...) -> (out, mean and var of each training-mode
    branch). Saved: out, and each branch's y, weight and statistics - not the activations."""

    @staticmethod
    def forward(ctx, eps, memory_format, *flat):
        branches = [BranchEpilogue(*flat[3 * i:3 * i + 3], e) for i, e in enumerate(eps)]
        out, stats = _store_all(branches, memory_format)
        means = [None if s is None else s[0] for s in stats]
        variances = [None if s is None else s[1] for s in stats]
        ctx.save_for_backward(out, *flat, *means, *variances)
        ctx.eps = eps
        batch_stats = [t for s in stats if s is not None for t in s]
        ctx.mark_non_differentiable(*batch_stats)
        return (out, *batch_stats)

    @staticmethod
    def backward(ctx, grad_out, *_grad_stats):
        out, *saved = ctx.saved_tensors
        k = len(ctx.eps)
        flat, means, variances = saved[:3 * k], saved[3 * k:4 * k], saved[4 * k:]
        grads, offset = [], 0
        for i, eps in enumerate(ctx.eps):
            y, weight, _bias = flat[3 * i:3 * i + 3]
            need = ctx.needs_input_grad[2 + 3 * i:5 + 3 * i]
            grad = grad_out.narrow(1, offset, y.shape[1])  # views: no copy of the output gradient
            gate = out.narrow(1, offset, y.shape[1])
            offset += y.shape[1]
            if eps is not None:
                grad_y, grad_weight, grad_bias, _ = batch_norm_relu_backward(grad, gate, y, weight, means[i],
                                                                             variances[i], eps, False)
            else:
                grad_y, grad_weight, grad_bias = _affine_backward(grad, gate, y, weight, need)
            grads += [grad_y if need[0] else None, grad_weight if need[1] else None, grad_bias if need[2] else None]
        return (None, None, *grads)


def _affine_backward(grad, gate, y, scale, need):
    """relu(y * scale + shift): grad_y = scale * dz, grad_scale = sum dz y, grad_shift = sum dz, with dz the gated
    gradient."""
    grad_y = grad_scale = grad_shift = None
    if need[0]:
        a = scale if scale is not None else torch.ones(y.shape[1], dtype=accumulation_dtype(y.dtype), device=y.device)
        grad_y = torch.ops.fastcnn.batch_norm_backward_elemt(grad, gate, y, None, a, None, None, False)[0]
    if (scale is not None and need[1]) or need[2]:
        grad_shift, grad_scale = torch.ops.fastcnn.batch_norm_backward_reduce(grad, gate, y, None)
    return grad_y, grad_scale, grad_shift


def concat_branches(branches, memory_format=torch.contiguous_format):
    """``torch.cat([relu(norm_i(branches[i].input)) for i], dim=1)`` computed without the concatenation copy.

    Args:
        branches: a sequence of ``BranchEpilogue(input, weight, bias, eps)``, one per branch, in channel order.
        memory_format: memory format of the output (the block input's, usually).

    Returns:
        ``(out, stats)`` where ``stats[i]`` is ``(batch mean, biased batch variance)`` of a training-mode branch (for
        the running-statistics update), else None.

    Shape:
        each input ``(N, C_i, H, W)``; output ``(N, sum C_i, H, W)``.

    Example:
        >>> y1, y2 = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
        >>> out, stats = concat_branches([BranchEpilogue(y1, None, torch.zeros(3)),
        ...                               BranchEpilogue(y2, torch.ones(4), torch.zeros(4), 1e-5)])
        >>> out.shape
        torch.Size([2, 7, 5, 5])
    """
    branches = [BranchEpilogue(*b) for b in branches]
    _check_branches(branches)
    if _backend_for(branches[0].input) == "reference":
        return reference.concat_branches(branches, memory_format)
    branches = [_in_accumulation_dtype(b) for b in branches]
    tensors = [t for b in branches for t in b[:3]]
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return _store_all(branches, memory_format)
    out, *batch_stats = _ConcatBranches.apply(tuple(b.eps for b in branches), memory_format, *tensors)
    pairs = iter(zip(batch_stats[0::2], batch_stats[1::2]))
    return out, [None if b.eps is None else next(pairs) for b in branches]
