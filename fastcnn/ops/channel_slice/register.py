"""The channel-slice store's registrations: the fake of fastcnn::scale_shift_relu_out (schema in csrc/fastcnn.cpp)
and the autograd of ``concat_branches`` on the compiled backends (`ConcatBranches`), which hands each branch the
gradient slice gated by its slice of the output and runs the fused BatchNorm backward ops. Registered only when the
loaded fastcnn._C has the ops (a build from older sources lacks them: the route table then warns and routes on)."""
import torch

from ... import _extension
from .. import batch_norm as _batch_norm_ops  # noqa: F401  (registers the BatchNorm ops' fakes and autograd)
from .._dispatch import accumulation_dtype
from .reference import BranchEpilogue, empty_concatenation

# The fastcnn._C ops the cpu and cuda backends call (the route table's stale-build check).
COMPILED_OPS = ("scale_shift_relu_out", "scale_shift_add_relu", "batch_norm_stats", "batch_norm_backward_reduce",
                "batch_norm_backward_elemt")

if _extension.LOADED and all(hasattr(torch.ops.fastcnn, op) for op in COMPILED_OPS):
    from ..batch_norm.register import TRAINING

    batch_norm_relu_backward = TRAINING.batch_norm_relu_backward

    @torch.library.register_fake("fastcnn::scale_shift_relu_out")
    def _store_fake(input, scale, shift, out):
        return None


def store_all(branches, memory_format):
    """(out, [(mean, var) or None per branch]): out allocated once, each branch stored into its slice."""
    out = empty_concatenation([b.input for b in branches], memory_format)
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


class ConcatBranches(torch.autograd.Function):
    """(eps per branch, memory_format, y_1, weight_1, bias_1, y_2, ...) -> (out, mean and var of each training-mode
    branch). Saved: out, and each branch's y, weight and statistics - not the activations."""

    @staticmethod
    def forward(ctx, eps, memory_format, *flat):
        branches = [BranchEpilogue(*flat[3 * i:3 * i + 3], e) for i, e in enumerate(eps)]
        out, stats = store_all(branches, memory_format)
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
