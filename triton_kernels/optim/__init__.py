"""The fused optimizer steps' Triton kernels (the ``fastcnn.ops.optim`` package's), one file per kind of step:

* here, the launchers ``adam_``, ``sgd_``, ``adagrad_``, ``lars_``;
* ``_common.py``: what every kernel shares - host scalars, opmath helpers, the multi-tensor work table;
* ``adam_sgd_adagrad.py``: the one-pass Adam/AdamW, SGD and Adagrad kernels and the step-counter increment;
* ``lars.py``: LARS's two kernels (per-chunk sums of squares, then the update).

Each launcher has exactly the arguments of its ``fastcnn::`` op schema (csrc/fastcnn.cpp), plus ``wrap`` (identity
by default; ``torch.library.wrap_triton`` inside a ``torch.library.triton_op``), and matches the plain-PyTorch oracle
``fastcnn/ops/optim/reference.py`` step for step. Nothing synchronises with the host: ``found_inf``, ``grad_scale``,
``lr_tensor`` and the step counters are read inside the kernels.

Launches per call and dtype signature (usually one signature per call):
  * multi-tensor mode (real tensors): Adam / Adagrad 2 (the update over a table of every tensor's chunks, then one
    program that increments the step counters), SGD 1, LARS 2 (partial sums, then the update).
  * per-tensor mode (tensors without addresses, as while torch.compile / opcheck trace a ``triton_op``; or CUDA
    tensors under the interpreter): the same kernels with the same counts per tensor, each passed its tensors
    directly, so ``wrap_triton`` sees every tensor a kernel reads or writes. (Under the interpreter ``wrap_triton``
    returns the kernel unchanged, so fake-tensor tracing of a ``triton_op`` cannot work there: check it on a GPU.)
found_inf: every program reads it first and, when it is nonzero, treats its tensor as empty: no loads, no stores,
and the step-increment kernel skips too, so nothing changes.
Step counters: all programs of a tensor compute t = step + 1 from the unmodified counter; the counters are written
only by the following increment kernel (a program that wrote it while others of the same tensor were still to read
it would race).
"""
from .._conv_common import identity
from ._common import LARS_MAX_PARTS, bits, chunk_size, config, groups, scalar_or
from .adam_sgd_adagrad import _adagrad_kernel, _adam_kernel, _sgd_kernel, _step_inc_kernel
from .lars import _lars_kernel, _lars_norms_kernel, partials_buffer


def _optional(dummy, lr_tensor, grad_scale, found_inf):
    # (tensor, present) for each optional 0-dim tensor; a missing one is replaced by a dummy the kernel never reads.
    for name, t in (("lr_tensor", lr_tensor), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and t.device != dummy.device:
            raise ValueError(f"{name} is on {t.device}, the tensors on {dummy.device}")
    return scalar_or(lr_tensor, dummy), scalar_or(grad_scale, dummy), scalar_or(found_inf, dummy)


def _prepare(rows, names, lr_tensor, grad_scale, found_inf, max_parts=None):
    """(cfg, chunk, launch groups, optional scalars) of one call; no groups when there is nothing to step."""
    cfg = config()
    chunk = chunk_size(cfg, rows, max_parts)
    grps = groups(rows, names, chunk)
    optional = _optional(rows[0][0], lr_tensor, grad_scale, found_inf) if grps else ((None, False),) * 3
    return cfg, chunk, grps, optional


def _with_buffer(grps, has_buf):
    """(group, params, grads, momentum buffers or params) for each group with work, for SGD and LARS."""
    for grp in grps:
        if grp.grid:
            p, g = grp.tensors[:2]
            yield grp, p, g, grp.tensors[2] if has_buf else p


def _step_inc(wrap, grp, steps_row, found, has_inf):
    wrap(_step_inc_kernel)[(1,)](grp.tensors[steps_row - 2], grp.tab, steps_row, grp.n_tensors, found,
                                 HAS_INF=has_inf, TABLE=grp.table, BLOCK=256)


def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor, beta1, beta2, weight_decay,
          eps, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf, wrap=None):
    """Adam / AdamW (``decoupled_weight_decay``) with optional AMSGrad, in place; see fastcnn.ops.optim.reference.adam_.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: lists of same-shape tensors (state may be fp32 beside bf16 params).
        max_exp_avg_sqs: like exp_avgs when ``amsgrad``, else empty. steps: 0-dim float tensors, incremented.
        lr, beta1, beta2, weight_decay, eps: floats; lr_tensor (0-dim, optional) replaces lr.
        grad_scale (optional): grads are divided by it, and the unscaled grads written back.
        found_inf (optional): nonzero means nothing changes. wrap: see the module docstring.
    """
    wrap = wrap or identity
    rows = [params, grads, exp_avgs, exp_avg_sqs, steps] + ([max_exp_avg_sqs] if amsgrad else [])
    names = ["params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "max_exp_avg_sqs"][:len(rows)]
    cfg, chunk, grps, optional = _prepare(rows, names, lr_tensor, grad_scale, found_inf)
    (lr_t, has_lr), (scale, has_scale), (found, has_inf) = optional
    for grp in grps:
        p, g, m, v, step = grp.tensors[:5]
        vmax = grp.tensors[5] if amsgrad else p
        if grp.grid:
            wrap(_adam_kernel)[(grp.grid,)](
                p, g, m, v, vmax, step, grp.tab, grp.work, grp.n_tensors, grp.numel, chunk, lr_t, scale, found,
                bits(lr), bits(beta1), bits(beta2), bits(weight_decay), bits(eps),
                HAS_LR_T=has_lr, HAS_SCALE=has_scale, HAS_INF=has_inf, HAS_WD=weight_decay != 0,
                AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize), DECOUPLED=bool(decoupled_weight_decay),
                TABLE=grp.table, ALIGNED=grp.aligned, F64=grp.f64, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
        _step_inc(wrap, grp, 6, found, has_inf)


def sgd_(params, grads, momentum_buffers, lr, lr_tensor, momentum, dampening, weight_decay, nesterov, maximize,
         is_first_step, grad_scale, found_inf, wrap=None):
    """SGD with momentum / dampening / Nesterov / L2 weight decay, in place; see fastcnn.ops.optim.reference.sgd_.

    ``momentum_buffers`` is empty when momentum == 0; ``is_first_step`` sets the buffers to the gradient.
    """
    wrap = wrap or identity
    has_mom = momentum != 0
    rows = [params, grads] + ([momentum_buffers] if has_mom else [])
    cfg, chunk, grps, optional = _prepare(rows, ["params", "grads", "momentum_buffers"][:len(rows)], lr_tensor,
                                          grad_scale, found_inf)
    (lr_t, has_lr), (scale, has_scale), (found, has_inf) = optional
    for grp, p, g, buf in _with_buffer(grps, has_mom):
        wrap(_sgd_kernel)[(grp.grid,)](
            p, g, buf, grp.tab, grp.work, grp.n_tensors, grp.numel, chunk, lr_t, scale, found,
            bits(lr), bits(weight_decay), bits(momentum), bits(dampening),
            HAS_LR_T=has_lr, HAS_SCALE=has_scale, HAS_INF=has_inf, HAS_WD=weight_decay != 0, HAS_MOM=has_mom,
            NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize), FIRST=bool(is_first_step), TABLE=grp.table,
            ALIGNED=grp.aligned, F64=grp.f64, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])


def adagrad_(params, grads, state_sums, steps, lr, lr_tensor, lr_decay, weight_decay, eps, maximize, grad_scale,
             found_inf, wrap=None):
    """Adagrad, in place; see fastcnn.ops.optim.reference.adagrad_. ``steps`` (0-dim float tensors) are incremented."""
    wrap = wrap or identity
    rows = [params, grads, state_sums, steps]
    cfg, chunk, grps, optional = _prepare(rows, ["params", "grads", "state_sums", "steps"], lr_tensor, grad_scale,
                                          found_inf)
    (lr_t, has_lr), (scale, has_scale), (found, has_inf) = optional
    for grp in grps:
        p, g, s, step = grp.tensors
        if grp.grid:
            wrap(_adagrad_kernel)[(grp.grid,)](
                p, g, s, step, grp.tab, grp.work, grp.n_tensors, grp.numel, chunk, lr_t, scale, found,
                bits(lr), bits(lr_decay), bits(weight_decay), bits(eps),
                HAS_LR_T=has_lr, HAS_SCALE=has_scale, HAS_INF=has_inf, HAS_WD=weight_decay != 0,
                MAXIMIZE=bool(maximize), TABLE=grp.table, ALIGNED=grp.aligned, F64=grp.f64, BLOCK=cfg["BLOCK"],
                num_warps=cfg["num_warps"])
        _step_inc(wrap, grp, 5, found, has_inf)


def lars_(params, grads, momentum_buffers, lr, lr_tensor, momentum, dampening, weight_decay, trust_coefficient, eps,
          nesterov, maximize, trust_clip, update_norm, lr_in_momentum, is_first_step, grad_scale, found_inf,
          wrap=None):
    """LARS on every tensor given, in place; see fastcnn.ops.optim.reference.lars_.

    ``momentum_buffers`` is empty when momentum == 0 and not ``lr_in_momentum``. Per-tensor norms come from a
    first kernel's per-chunk partial sums, reduced in a fixed order by the update kernel: deterministic.
    """
    wrap = wrap or identity
    has_mom = momentum != 0
    has_buf = has_mom or bool(lr_in_momentum)
    rows = [params, grads] + ([momentum_buffers] if has_buf else [])
    cfg, chunk, grps, optional = _prepare(rows, ["params", "grads", "momentum_buffers"][:len(rows)], lr_tensor,
                                          grad_scale, found_inf, LARS_MAX_PARTS)
    (lr_t, has_lr), (scale, has_scale), (found, has_inf) = optional
    for grp, p, g, buf in _with_buffer(grps, has_buf):
        parts = partials_buffer(grp, p)
        wrap(_lars_norms_kernel)[(grp.grid,)](
            p, g, parts, grp.tab, grp.work, grp.n_tensors, grp.numel, chunk, scale, found, bits(weight_decay),
            HAS_SCALE=has_scale, HAS_INF=has_inf, MAXIMIZE=bool(maximize), UPDATE_NORM=bool(update_norm),
            TABLE=grp.table, ALIGNED=grp.aligned, F64=grp.f64, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
        wrap(_lars_kernel)[(grp.grid,)](
            p, g, buf, parts, grp.tab, grp.work, grp.n_tensors, grp.numel, chunk, lr_t, scale, found,
            bits(lr), bits(momentum), bits(dampening), bits(weight_decay), bits(trust_coefficient), bits(eps),
            HAS_LR_T=has_lr, HAS_SCALE=has_scale, HAS_INF=has_inf, HAS_MOM=has_mom, NESTEROV=bool(nesterov),
            MAXIMIZE=bool(maximize), TRUST_CLIP=bool(trust_clip), UPDATE_NORM=bool(update_norm),
            LR_IN_MOM=bool(lr_in_momentum), FIRST=bool(is_first_step), TABLE=grp.table, ALIGNED=grp.aligned,
            F64=grp.f64, BLOCK=cfg["BLOCK"], RBLOCK=cfg["RBLOCK"], num_warps=cfg["num_warps"])
