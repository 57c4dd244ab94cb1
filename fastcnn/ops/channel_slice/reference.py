"""Plain-PyTorch versions of the Inception-style concatenation without a concatenation copy: the test oracle and the
last-resort backend.

An Inception block's output is ``cat([relu(norm_1(y_1)), ..., relu(norm_k(y_k))], dim=1)``, where ``y_i`` is branch
i's last convolution output. Instead of computing each branch's activation and copying them all into the
concatenation, the output is allocated once and each branch's normalise + ReLU stores straight into its channel
slice ``out[:, offset_i : offset_i + C_i]`` (a strided view).

* ``scale_shift_relu_out(x, scale, shift, out)``: ``out = relu(x * scale[c] + shift[c])`` written into ``out`` (any
  strides), computed in the accumulation dtype and rounded once.
* ``concat_branches(branches, memory_format)``: the whole concatenation, differentiable by autograd (each slice is
  filled by ``copy_`` into a view, which autograd differentiates as a slice assignment). Each branch is normalised
  either by an affine map ``y * scale + shift`` (eval-mode BatchNorm, or BatchNorm folded away: ``scale=None``) or
  by training-mode BatchNorm with batch statistics.
"""
from typing import NamedTuple, Optional

import torch

from ..batch_norm.reference import batch_norm_add_relu, scale_shift_add_relu
from .._dispatch import accumulation_dtype


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


def scale_shift_relu_out(x, scale, shift, out):
    """Writes ``relu(x * scale + shift)`` (scale None: 1) into ``out``; returns nothing."""
    out.copy_(scale_shift_add_relu(x, scale, shift, None, False)[0])


def empty_concatenation(inputs, memory_format):
    """An uninitialised tensor shaped like ``torch.cat(inputs, 1)``, in ``memory_format``."""
    first = inputs[0]
    channels = sum(t.shape[1] for t in inputs)
    return torch.empty((first.shape[0], channels, *first.shape[2:]), dtype=first.dtype, device=first.device,
                       memory_format=memory_format)


def concat_branches(branches, memory_format):
    """``(out, stats)``: ``out`` holds every branch's ``relu(norm(input))`` in its channel slice, in
    ``memory_format``; ``stats[i]`` is ``(batch mean, biased var)`` of a training-mode branch, else None.

    Each branch is ``(input, weight, bias, eps)``: with ``eps`` None an affine map (``weight`` the scale, None for 1;
    ``bias`` the shift), otherwise training-mode BatchNorm with ``gamma = weight`` and ``beta = bias``."""
    out = empty_concatenation([b.input for b in branches], memory_format)
    stats, offset = [], 0
    for y, weight, bias, eps in branches:
        if eps is None:
            acc = accumulation_dtype(y.dtype)
            scale = None if weight is None else weight.to(acc)
            activation, pair = scale_shift_add_relu(y, scale, bias.to(acc), None, False)[0], None
        else:
            activation, mean, var = batch_norm_add_relu(y, weight, bias, eps, None)
            pair = (mean, var)
        out.narrow(1, offset, y.shape[1]).copy_(activation)
        stats.append(pair)
        offset += y.shape[1]
    return out, stats
