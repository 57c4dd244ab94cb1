"""Triton kernels of the fused Adam/AdamW, SGD and Adagrad steps, and the step-counter increment.

Each kernel serves both launch modes (see _common): TABLE=True, one program per chunk of the multi-tensor work
table; TABLE=False, one tensor with direct pointers. Full tiles use a mask whose bound is a multiple of BLOCK (so the
compiler can vectorise them); the tensor's last tile uses the true bound. Math runs in the opmath type (fp32, or fp64
for fp64 params), with every step of the reference (fastcnn/ops/optim/reference.py) in the same order: each scalar
expression in float64, rounded to opmath when it meets a tensor; divisions and square roots IEEE-rounded.
"""
import triton
import triton.language as tl

from .._rounding import _store
from ._common import (_div, _grad, _grad_scale, _heavy_ball, _hp, _lr, _om, _param_grad_ptrs, _powi, _row_ptr,
                           _sqrt, _whole_tile, _work)

_ADAM_HP = ["lr_bits", "beta1_bits", "beta2_bits", "wd_bits", "eps_bits"]


@triton.jit
def _adam_tile(offs, mask, p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, scale, lr_wd, wd, beta1, omb1, beta2, omb2,
               step_size, bc2s, eps, HAS_SCALE: tl.constexpr, HAS_WD: tl.constexpr, AMSGRAD: tl.constexpr,
               MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, F64: tl.constexpr):
    g = _grad(g_ptr, offs, mask, scale, beta1, HAS_SCALE, MAXIMIZE, F64, True)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(beta1.dtype)
    if HAS_WD:
        if DECOUPLED:
            p = p - lr_wd * p
        else:
            g = g + wd * p
    m = beta1 * tl.load(m_ptr + offs, mask=mask, other=0.0).to(beta1.dtype) + omb1 * g
    v = beta2 * tl.load(v_ptr + offs, mask=mask, other=0.0).to(beta1.dtype) + omb2 * g * g
    _store(m_ptr + offs, m, mask)
    _store(v_ptr + offs, v, mask)
    if AMSGRAD:
        v = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(beta1.dtype), v,
                       propagate_nan=tl.PropagateNan.ALL)
        _store(vmax_ptr + offs, v, mask)
    denom = _div(_sqrt(v, F64), bc2s, F64) + eps
    p = p - _div(step_size * m, denom, F64)
    _store(p_ptr + offs, p, mask)


# Adam / AdamW, per element, t = step + 1 (the step tensors are incremented afterwards by _step_inc_kernel):
#   g = grad / scale [written back]; g = -g if maximize
#   AdamW: p = p - (lr*wd) * p            Adam: g = g + wd * p            (only when wd != 0)
#   m = b1*m + (1-b1)*g;  v = (b2*v + ((1-b2)*g)*g);  amsgrad: v = vmax = max(vmax, v)
#   p = p - ((lr / (1 - b1^t)) * m) / (sqrt(v) / sqrt(1 - b2^t) + eps)      (the scalar factors in float64)
@triton.jit(do_not_specialize=_ADAM_HP)
def _adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, step_ptr, tab_ptr, work_ptr, n_tensors, numel, chunk,
                 lr_ptr, scale_ptr, inf_ptr, lr_bits, beta1_bits, beta2_bits, wd_bits, eps_bits,
                 HAS_LR_T: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, HAS_WD: tl.constexpr,
                 AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, TABLE: tl.constexpr,
                 ALIGNED: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    tid, start, end, n = _work(tl.program_id(0), work_ptr, tab_ptr, numel, chunk, inf_ptr, HAS_INF, TABLE)
    if TABLE:
        p_ptr, g_ptr = _param_grad_ptrs(tab_ptr, n_tensors, tid, p_ptr, g_ptr, ALIGNED)
        m_ptr = _row_ptr(tab_ptr, 4, n_tensors, tid, m_ptr, ALIGNED)
        v_ptr = _row_ptr(tab_ptr, 5, n_tensors, tid, v_ptr, ALIGNED)
        step_ptr = _row_ptr(tab_ptr, 6, n_tensors, tid, step_ptr, False)
        if AMSGRAD:
            vmax_ptr = _row_ptr(tab_ptr, 7, n_tensors, tid, vmax_ptr, ALIGNED)
    # Scalars in float64 as the reference computes them, each rounded to opmath where it meets a tensor.
    lr = _lr(lr_ptr, lr_bits, HAS_LR_T)
    b1 = _hp(beta1_bits)
    b2 = _hp(beta2_bits)
    wd = _hp(wd_bits)
    t = (tl.load(step_ptr) + 1).to(tl.float64)
    step_size = _om(lr / (1.0 - _powi(b1, t)), F64)
    bc2s = _om(tl.sqrt(1.0 - _powi(b2, t)), F64)
    lr_wd = _om(lr * wd, F64)
    omb1 = _om(1.0 - b1, F64)
    omb2 = _om(1.0 - b2, F64)
    eps = _om(_hp(eps_bits), F64)
    wd = _om(wd, F64)
    b1 = _om(b1, F64)
    b2 = _om(b2, F64)
    scale = _grad_scale(scale_ptr, HAS_SCALE, F64)
    # Full tiles (their mask bound is a multiple of BLOCK, so loads and stores vectorise), then the tail.
    full_end = start + (end - start) // BLOCK * BLOCK
    for it in range(start, full_end, BLOCK):
        offs, whole = _whole_tile(it, BLOCK)
        _adam_tile(offs, whole, p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, scale, lr_wd, wd, b1, omb1, b2,
                   omb2, step_size, bc2s, eps, HAS_SCALE, HAS_WD, AMSGRAD, MAXIMIZE, DECOUPLED, F64)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _adam_tile(offs, offs < end, p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, scale, lr_wd, wd, b1, omb1, b2, omb2,
                   step_size, bc2s, eps, HAS_SCALE, HAS_WD, AMSGRAD, MAXIMIZE, DECOUPLED, F64)


@triton.jit
def _sgd_tile(offs, mask, p_ptr, g_ptr, b_ptr, scale, lr, wd, mom, omd, HAS_SCALE: tl.constexpr,
              HAS_WD: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
              FIRST: tl.constexpr, F64: tl.constexpr):
    g = _grad(g_ptr, offs, mask, scale, lr, HAS_SCALE, MAXIMIZE, F64, True)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(lr.dtype)
    if HAS_WD:
        g = g + wd * p
    if HAS_MOM:
        g = _heavy_ball(b_ptr, offs, mask, g, mom, omd, FIRST, NESTEROV)
    _store(p_ptr + offs, p - lr * g, mask)


# SGD, per element (torch.optim.SGD):
#   g = grad / scale [written back]; g = -g if maximize; g = g + wd*p (wd != 0)
#   momentum != 0: b = g on the first step, else b = mu*b + (1-dampening)*g; g = g + mu*b (nesterov) or g = b
#   p = p - lr*g
@triton.jit(do_not_specialize=["lr_bits", "wd_bits", "mom_bits", "damp_bits"])
def _sgd_kernel(p_ptr, g_ptr, b_ptr, tab_ptr, work_ptr, n_tensors, numel, chunk, lr_ptr, scale_ptr, inf_ptr,
                lr_bits, wd_bits, mom_bits, damp_bits,
                HAS_LR_T: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, HAS_WD: tl.constexpr,
                HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, FIRST: tl.constexpr,
                TABLE: tl.constexpr, ALIGNED: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    tid, start, end, n = _work(tl.program_id(0), work_ptr, tab_ptr, numel, chunk, inf_ptr, HAS_INF, TABLE)
    if TABLE:
        p_ptr, g_ptr = _param_grad_ptrs(tab_ptr, n_tensors, tid, p_ptr, g_ptr, ALIGNED)
        if HAS_MOM:
            b_ptr = _row_ptr(tab_ptr, 4, n_tensors, tid, b_ptr, ALIGNED)
    scale = _grad_scale(scale_ptr, HAS_SCALE, F64)
    lr = _om(_lr(lr_ptr, lr_bits, HAS_LR_T), F64)
    wd = _om(_hp(wd_bits), F64)
    mom = _om(_hp(mom_bits), F64)
    omd = _om(1.0 - _hp(damp_bits), F64)
    # Full tiles (their mask bound is a multiple of BLOCK, so loads and stores vectorise), then the tail.
    full_end = start + (end - start) // BLOCK * BLOCK
    for it in range(start, full_end, BLOCK):
        offs, whole = _whole_tile(it, BLOCK)
        _sgd_tile(offs, whole, p_ptr, g_ptr, b_ptr, scale, lr, wd, mom, omd,
                  HAS_SCALE, HAS_WD, HAS_MOM, NESTEROV, MAXIMIZE, FIRST, F64)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _sgd_tile(offs, offs < end, p_ptr, g_ptr, b_ptr, scale, lr, wd, mom, omd,
                  HAS_SCALE, HAS_WD, HAS_MOM, NESTEROV, MAXIMIZE, FIRST, F64)


@triton.jit
def _adagrad_tile(offs, mask, p_ptr, g_ptr, s_ptr, scale, clr, wd, eps, HAS_SCALE: tl.constexpr,
                  HAS_WD: tl.constexpr, MAXIMIZE: tl.constexpr, F64: tl.constexpr):
    g = _grad(g_ptr, offs, mask, scale, clr, HAS_SCALE, MAXIMIZE, F64, True)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(clr.dtype)
    if HAS_WD:
        g = g + wd * p
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(clr.dtype) + g * g
    _store(s_ptr + offs, s, mask)
    p = p - _div(clr * g, _sqrt(s, F64) + eps, F64)
    _store(p_ptr + offs, p, mask)


# Adagrad, per element (torch.optim.Adagrad), t = step + 1 (steps incremented afterwards by _step_inc_kernel):
#   g = grad / scale [written back]; g = -g if maximize; g = g + wd*p (wd != 0)
#   s = s + g*g;  p = p - ((lr / (1 + (t-1)*lr_decay)) * g) / (sqrt(s) + eps)      (the scalar factor in float64)
@triton.jit(do_not_specialize=["lr_bits", "decay_bits", "wd_bits", "eps_bits"])
def _adagrad_kernel(p_ptr, g_ptr, s_ptr, step_ptr, tab_ptr, work_ptr, n_tensors, numel, chunk, lr_ptr, scale_ptr,
                    inf_ptr, lr_bits, decay_bits, wd_bits, eps_bits,
                    HAS_LR_T: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, HAS_WD: tl.constexpr,
                    MAXIMIZE: tl.constexpr, TABLE: tl.constexpr, ALIGNED: tl.constexpr, F64: tl.constexpr,
                    BLOCK: tl.constexpr):
    tid, start, end, n = _work(tl.program_id(0), work_ptr, tab_ptr, numel, chunk, inf_ptr, HAS_INF, TABLE)
    if TABLE:
        p_ptr, g_ptr = _param_grad_ptrs(tab_ptr, n_tensors, tid, p_ptr, g_ptr, ALIGNED)
        s_ptr = _row_ptr(tab_ptr, 4, n_tensors, tid, s_ptr, ALIGNED)
        step_ptr = _row_ptr(tab_ptr, 5, n_tensors, tid, step_ptr, False)
    t = (tl.load(step_ptr) + 1).to(tl.float64)
    clr = _lr(lr_ptr, lr_bits, HAS_LR_T) / (1.0 + (t - 1.0) * _hp(decay_bits))
    scale = _grad_scale(scale_ptr, HAS_SCALE, F64)
    clr = _om(clr, F64)
    wd = _om(_hp(wd_bits), F64)
    eps = _om(_hp(eps_bits), F64)
    # Full tiles (their mask bound is a multiple of BLOCK, so loads and stores vectorise), then the tail.
    full_end = start + (end - start) // BLOCK * BLOCK
    for it in range(start, full_end, BLOCK):
        offs, whole = _whole_tile(it, BLOCK)
        _adagrad_tile(offs, whole, p_ptr, g_ptr, s_ptr, scale, clr, wd, eps, HAS_SCALE, HAS_WD,
                      MAXIMIZE, F64)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _adagrad_tile(offs, offs < end, p_ptr, g_ptr, s_ptr, scale, clr, wd, eps, HAS_SCALE, HAS_WD, MAXIMIZE, F64)


# steps[i] = steps[i] + 1 for every tensor, unless found_inf. A separate launch after the update: the update's
# programs all read t = step + 1 first, and several programs share one tensor, so none of them may write it.
@triton.jit
def _step_inc_kernel(step_ptr, tab_ptr, row, n_tensors, inf_ptr, HAS_INF: tl.constexpr, TABLE: tl.constexpr,
                     BLOCK: tl.constexpr):
    n = n_tensors
    if HAS_INF:
        n = tl.where(tl.load(inf_ptr) != 0, 0, n)
    for base in range(0, n, BLOCK):
        offs = base + tl.arange(0, BLOCK)
        mask = offs < n
        if TABLE:
            ptrs = tl.load(tab_ptr + row * n_tensors + offs, mask=mask, other=0).to(step_ptr.dtype)
        else:
            ptrs = step_ptr + offs
        s = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, s + 1, mask=mask)
