"""Concatenation without a concatenation copy, for Inception-style blocks: each branch's last stage (normalise +
ReLU) stores straight into its channel slice of the block output (math in reference.py; autograd in register.py).

* ``scale_shift_relu_out(x, scale, shift, out)``: the op ``fastcnn::scale_shift_relu_out`` - ``relu(x * scale +
  shift)`` written into ``out``, a tensor of x's shape with any strides (a channel slice of the output).
* ``concat_branches(branches, memory_format)``: allocates the concatenated output once and fills every slice, as
  one autograd Function. Its backward hands each branch the gradient slice (a view of the output gradient) gated by
  the branch's slice of the output itself (``out > 0`` is ReLU's mask, so nothing extra is saved), then runs
  BatchNorm's backward (training) or the affine map's (eval) with the existing fused BatchNorm ops.

Backends, in the order tried (`ROUTES`, one table for both functions): on CPU tensors "cpu", on CUDA tensors "cuda"
(kernels of fastcnn._C); "reference" (plain PyTorch, differentiated by autograd) everywhere. There is no Triton
kernel (a plain strided store).
"""
import torch

from .._dispatch import CPU_RESULTS, Route, RouteTable, accumulation_dtype, route
from . import reference
from . import register
from .reference import BranchEpilogue

ROUTES = RouteTable("scale_shift_relu_out", [
    Route("cuda", device="cuda"),
    # Serves the fused Inception block, which on CPU (fp32) runs its stock layers (fastcnn/nn/inception.py ROUTES);
    # this entry serves the other dtypes and a forced fused path.
    Route("cpu", measured=f"{CPU_RESULTS}_inception.json#inception3a", device="cpu"),
], compiled=register.COMPILED_OPS)


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
    if route(ROUTES, x) == "reference":
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
    if route(ROUTES, branches[0].input) == "reference":
        return reference.concat_branches(branches, memory_format)
    branches = [_in_accumulation_dtype(b) for b in branches]
    tensors = [t for b in branches for t in b[:3]]
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)):
        return register.store_all(branches, memory_format)
    out, *batch_stats = register.ConcatBranches.apply(tuple(b.eps for b in branches), memory_format, *tensors)
    pairs = iter(zip(batch_stats[0::2], batch_stats[1::2]))
    return out, [None if b.eps is None else next(pairs) for b in branches]


__all__ = ["ROUTES", "BranchEpilogue", "concat_branches", "scale_shift_relu_out"]
