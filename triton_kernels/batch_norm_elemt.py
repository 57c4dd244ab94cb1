"""Elementwise passes of the fused BatchNorm ops (math in fastcnn/ops/batch_norm/reference.py):

* apply: ``out = relu(x * scale[c] + shift[c] + residual)`` and, optionally, the uint8 ReLU mask ``not out <= 0``
  (taken on the rounded output, so NaN passes the gradient as ReLU's backward does);
* backward: ``dz = grad_out`` where ``gate > 0`` (gate: that mask, or a recomputed activation), else 0, and
  ``grad_x = a[c] (dz - b[c] (x - mean[c]) - d[c])``, plus ``dz`` itself for a residual's gradient.

Every tensor of one call is dense in x's layout (NCHW or channels_last), so the kernels walk storage as one flat
range of int64 offsets ``i``, fully coalesced, and read the channel as ``c = (i // stride_c) % C`` (stride_c = H*W in
NCHW, 1 in channels_last). Arithmetic is in the per-channel tensors' dtype (fp32, or fp64 for fp64 inputs) and each
result is rounded once.
"""
import triton
import triton.language as tl

from ._conv_common import identity, interpreting
from ._rounding import _store


@triton.jit
def _flat(numel, C, STRIDE_C, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < numel, (offs // STRIDE_C) % C


@triton.jit
def _apply_kernel(x_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, mask_ptr, numel, C, STRIDE_C,
                  HAS_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SAVE_MASK: tl.constexpr,
                  BLOCK: tl.constexpr):
    offs, mask, c = _flat(numel, C, STRIDE_C, BLOCK)
    acc_t = shift_ptr.dtype.element_ty
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
    if HAS_SCALE:
        v = v * tl.load(scale_ptr + c, mask=mask, other=1.0)
    v = v + tl.load(shift_ptr + c, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        v = v + tl.load(res_ptr + offs, mask=mask, other=0.0).to(acc_t)
    v = tl.where(v <= 0, 0.0, v)  # ReLU that keeps NaN
    _store(out_ptr + offs, v, mask)
    if SAVE_MASK:
        rounded = v.to(out_ptr.dtype.element_ty).to(acc_t)
        tl.store(mask_ptr + offs, (~(rounded <= 0)).to(tl.uint8), mask=mask)


@triton.jit
def _backward_elemt_kernel(g_ptr, gate_ptr, x_ptr, mean_ptr, a_ptr, b_ptr, d_ptr, grad_x_ptr, dz_ptr, numel, C,
                           STRIDE_C, HAS_MEAN: tl.constexpr, HAS_B: tl.constexpr, HAS_D: tl.constexpr,
                           WANT_DZ: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask, c = _flat(numel, C, STRIDE_C, BLOCK)
    acc_t = a_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + offs, mask=mask, other=0).to(acc_t)
    dz = tl.where(gate <= 0, 0.0, tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_t))
    inner = dz
    if HAS_B:
        centred = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        if HAS_MEAN:
            centred = centred - tl.load(mean_ptr + c, mask=mask, other=0.0)
        inner = inner - tl.load(b_ptr + c, mask=mask, other=0.0) * centred
    if HAS_D:
        inner = inner - tl.load(d_ptr + c, mask=mask, other=0.0)
    _store(grad_x_ptr + offs, tl.load(a_ptr + c, mask=mask, other=0.0) * inner, mask)
    if WANT_DZ:
        _store(dz_ptr + offs, dz, mask)


def _launch(numel):
    block = 256 if interpreting() else 1024
    return (triton.cdiv(numel, block),), dict(BLOCK=block)


def scale_shift_add_relu(x, scale, shift, residual, out, mask, wrap=None):
    """Write ``relu(x * scale + shift + residual)`` into ``out`` and, when ``mask`` is not empty, its ReLU mask.

    Args:
        x: ``[N, C, H, W]``, dense (NCHW or channels_last); residual (or None), out and mask (uint8, or empty) have
            x's shape and strides.
        scale (or None for 1), shift: ``[C]`` in the accumulation dtype (float32, or float64 for float64 ``x``).
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op``; identity by default.
    """
    wrap = wrap or identity
    grid, cfg = _launch(x.numel())
    wrap(_apply_kernel)[grid](
        x, shift if scale is None else scale, shift, x if residual is None else residual, out,
        mask if mask.numel() else out, x.numel(), x.shape[1], x.stride(1),
        HAS_SCALE=scale is not None, HAS_RESIDUAL=residual is not None, SAVE_MASK=mask.numel() > 0, **cfg)


def batch_norm_backward_elemt(grad_out, gate, x, mean, a, b, d, grad_x, dz, wrap=None):
    """Write ``grad_x = a (dz - b (x - mean) - d)`` and, when ``dz`` is not empty, ``dz`` itself.

    Args:
        grad_out, gate (uint8 mask or x's dtype), x: ``[N, C, H, W]``, dense, sharing x's strides; grad_x and dz
            (or empty) too.
        mean, b, d (each None for 0), a: ``[C]`` in the accumulation dtype.
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op``; identity by default.
    """
    wrap = wrap or identity
    grid, cfg = _launch(x.numel())
    wrap(_backward_elemt_kernel)[grid](
        grad_out, gate, x, a if mean is None else mean, a, a if b is None else b, a if d is None else d, grad_x,
        dz if dz.numel() else grad_x, x.numel(), x.shape[1], x.stride(1),
        HAS_MEAN=mean is not None, HAS_B=b is not None, HAS_D=d is not None, WANT_DZ=dz.numel() > 0, **cfg)
