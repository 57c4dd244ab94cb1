"""Triton kernels of the fused LARS step: per-chunk sums of squares, then the update.

Two launches per dtype signature, no host synchronisation and no float atomics:
  1. ``_lars_norms_kernel``: each program writes its chunk's (sum p^2, sum g^2) in opmath to ``partials[chunk]``.
  2. ``_lars_kernel``: each program re-reduces its tensor's partials, in chunk order with a fixed tile shape (so every
     program of a tensor gets the same bits, run after run), computes the trust ratio and updates its chunk.
The launcher grows the chunk for very large tensors so that no tensor has more than LARS_MAX_PARTS partials: the
re-reduction costs each program at most that many L2-resident loads.
"""
import torch
import triton
import triton.language as tl

from .._rounding import _store
from ._common import (_div, _grad, _grad_scale, _heavy_ball, _hp, _lr, _om, _param_grad_ptrs, _row_ptr, _sqrt,
                           _whole_tile, _work)


@triton.jit
def _lars_sq_tile(offs, mask, p_ptr, g_ptr, scale, wd, acc_w, acc_g, HAS_SCALE: tl.constexpr,
                  MAXIMIZE: tl.constexpr, UPDATE_NORM: tl.constexpr, F64: tl.constexpr):
    g = _grad(g_ptr, offs, mask, scale, wd, HAS_SCALE, MAXIMIZE, F64, False)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(wd.dtype)
    if UPDATE_NORM:
        g = g + wd * p
    return acc_w + p * p, acc_g + g * g


# Per chunk (masked lanes add 0):  partials[chunk] = (sum p^2, sum u^2),  u = g (default) or g + wd*p (update_norm),
# with g = grad / scale, negated when maximizing; nothing is written back here (the update kernel does).
@triton.jit(do_not_specialize=["wd_bits"])
def _lars_norms_kernel(p_ptr, g_ptr, part_ptr, tab_ptr, work_ptr, n_tensors, numel, chunk, scale_ptr, inf_ptr,
                       wd_bits, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, MAXIMIZE: tl.constexpr,
                       UPDATE_NORM: tl.constexpr, TABLE: tl.constexpr, ALIGNED: tl.constexpr, F64: tl.constexpr,
                       BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    tid, start, end, n = _work(pid, work_ptr, tab_ptr, numel, chunk, inf_ptr, HAS_INF, TABLE)
    if TABLE:
        p_ptr, g_ptr = _param_grad_ptrs(tab_ptr, n_tensors, tid, p_ptr, g_ptr, ALIGNED)
    wd = _om(_hp(wd_bits), F64)
    scale = _grad_scale(scale_ptr, HAS_SCALE, F64)
    acc_w = tl.zeros([BLOCK], wd.dtype)
    acc_g = tl.zeros([BLOCK], wd.dtype)
    # Full tiles (their mask bound is a multiple of BLOCK, so loads and stores vectorise), then the tail.
    full_end = start + (end - start) // BLOCK * BLOCK
    for it in range(start, full_end, BLOCK):
        offs, whole = _whole_tile(it, BLOCK)
        acc_w, acc_g = _lars_sq_tile(offs, whole, p_ptr, g_ptr, scale, wd, acc_w, acc_g,
                                     HAS_SCALE, MAXIMIZE, UPDATE_NORM, F64)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        acc_w, acc_g = _lars_sq_tile(offs, offs < end, p_ptr, g_ptr, scale, wd, acc_w, acc_g,
                                     HAS_SCALE, MAXIMIZE, UPDATE_NORM, F64)
    tl.store(part_ptr + 2 * pid, tl.sum(acc_w, axis=0))
    tl.store(part_ptr + 2 * pid + 1, tl.sum(acc_g, axis=0))


@triton.jit
def _lars_tile(offs, mask, p_ptr, g_ptr, b_ptr, scale, ratio, lr, wd, mom, omd, HAS_SCALE: tl.constexpr,
               HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, LR_IN_MOM: tl.constexpr,
               FIRST: tl.constexpr, F64: tl.constexpr):
    g = _grad(g_ptr, offs, mask, scale, lr, HAS_SCALE, MAXIMIZE, F64, True)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(lr.dtype)
    d = ratio * (g + wd * p)
    if LR_IN_MOM:
        if FIRST:
            b = lr * d
        else:
            b = mom * tl.load(b_ptr + offs, mask=mask, other=0.0).to(lr.dtype) + lr * d
        _store(b_ptr + offs, b, mask)
        if NESTEROV:
            p = p - (lr * d + mom * b)
        else:
            p = p - b
    else:
        if HAS_MOM:
            d = _heavy_ball(b_ptr, offs, mask, d, mom, omd, FIRST, NESTEROV)
        p = p - lr * d
    _store(p_ptr + offs, p, mask)


# Per tensor (opmath scalars):  wn = sqrt(sum p^2), gn = sqrt(sum u^2) over its partials, in chunk order;
#   ratio = (eta*wn) / ((gn + wd*wn) + eps)   or, update_norm, (eta*wn) / (gn + eps);   ratio = 1 unless wn, gn > 0
#   trust_clip: ratio = min(ratio / lr, 1)
# Per element, g = grad / scale [written back], negated when maximizing;  d = ratio * (g + wd*p)
#   default:        b = d (first step) or mu*b + (1-dampening)*d  [momentum != 0];  d = d + mu*b (nesterov) or b;
#                   p = p - lr*d
#   lr_in_momentum: b = lr*d (first step) or mu*b + lr*d;  p = p - (lr*d + mu*b) (nesterov) or p - b
@triton.jit(do_not_specialize=["lr_bits", "mom_bits", "damp_bits", "wd_bits", "tc_bits", "eps_bits"])
def _lars_kernel(p_ptr, g_ptr, b_ptr, part_ptr, tab_ptr, work_ptr, n_tensors, numel, chunk, lr_ptr, scale_ptr,
                 inf_ptr, lr_bits, mom_bits, damp_bits, wd_bits, tc_bits, eps_bits,
                 HAS_LR_T: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, HAS_MOM: tl.constexpr,
                 NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, TRUST_CLIP: tl.constexpr,
                 UPDATE_NORM: tl.constexpr, LR_IN_MOM: tl.constexpr, FIRST: tl.constexpr, TABLE: tl.constexpr,
                 ALIGNED: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr):
    # Chunks in reverse order: the first programs to run get the chunks the norms kernel read last, still in L2.
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    tid, start, end, n = _work(pid, work_ptr, tab_ptr, numel, chunk, inf_ptr, HAS_INF, TABLE)
    first = tid * 0
    if TABLE:
        first = tl.load(tab_ptr + n_tensors + tid)
        p_ptr, g_ptr = _param_grad_ptrs(tab_ptr, n_tensors, tid, p_ptr, g_ptr, ALIGNED)
        if HAS_MOM or LR_IN_MOM:
            b_ptr = _row_ptr(tab_ptr, 4, n_tensors, tid, b_ptr, ALIGNED)
    lr = _om(_lr(lr_ptr, lr_bits, HAS_LR_T), F64)
    wd = _om(_hp(wd_bits), F64)
    # The tensor's sums of squares, from its partials in a fixed order (no partials at all when found_inf: n = 0).
    n_parts = (n + chunk - 1) // chunk
    sq_w = tl.zeros([RBLOCK], wd.dtype)
    sq_g = tl.zeros([RBLOCK], wd.dtype)
    for k in range(0, n_parts, RBLOCK):
        j = k + tl.arange(0, RBLOCK)
        jm = j < n_parts
        sq_w += tl.load(part_ptr + 2 * (first + j), mask=jm, other=0.0)
        sq_g += tl.load(part_ptr + 2 * (first + j) + 1, mask=jm, other=0.0)
    w_norm = _sqrt(tl.sum(sq_w, axis=0), F64)
    g_norm = _sqrt(tl.sum(sq_g, axis=0), F64)
    tc = _om(_hp(tc_bits), F64)
    eps = _om(_hp(eps_bits), F64)
    if UPDATE_NORM:
        ratio = _div(tc * w_norm, g_norm + eps, F64)
    else:
        ratio = _div(tc * w_norm, g_norm + wd * w_norm + eps, F64)
    ratio = tl.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)
    if TRUST_CLIP:
        ratio = tl.minimum(_div(ratio, lr, F64), 1.0)
    mom = _om(_hp(mom_bits), F64)
    omd = _om(1.0 - _hp(damp_bits), F64)
    scale = _grad_scale(scale_ptr, HAS_SCALE, F64)
    # Full tiles (their mask bound is a multiple of BLOCK, so loads and stores vectorise), then the tail.
    full_end = start + (end - start) // BLOCK * BLOCK
    for it in range(start, full_end, BLOCK):
        offs, whole = _whole_tile(it, BLOCK)
        _lars_tile(offs, whole, p_ptr, g_ptr, b_ptr, scale, ratio, lr, wd, mom, omd,
                   HAS_SCALE, HAS_MOM, NESTEROV, MAXIMIZE, LR_IN_MOM, FIRST, F64)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _lars_tile(offs, offs < end, p_ptr, g_ptr, b_ptr, scale, ratio, lr, wd, mom, omd,
                   HAS_SCALE, HAS_MOM, NESTEROV, MAXIMIZE, LR_IN_MOM, FIRST, F64)


def partials_buffer(group, like):
    """Scratch for one launch's partial sums: [chunks, 2] in the opmath type."""
    dtype = torch.float64 if group.f64 else torch.float32
    return torch.empty((max(group.grid, 1), 2), dtype=dtype, device=like.device)
