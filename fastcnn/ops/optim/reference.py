"""Plain-PyTorch fused-optimizer steps: the test oracle of every optimizer backend and the last-resort fallback.

Each function has the signature of its fastcnn:: op (csrc/fastcnn.cpp) and updates its lists in place. Common rules:

* ``found_inf`` (0-dim, nonzero = skip): when set, nothing changes, steps included.
* ``grad_scale`` (0-dim): gradients are divided by it first and the unscaled gradients are written back.
* ``lr_tensor`` (0-dim float32), when given, replaces ``lr``.
* Math runs in float32 ("opmath") for float16/bfloat16 tensors and in float64 for float64 ones; results are rounded
  to each tensor's dtype on store. Optimizer state (exp_avg, sums, momentum buffers) may be float32 beside
  low-precision params. Step counters are float tensors, as torch.optim keeps them.

The order of operations follows torch.optim's fused kernels (e.g. ``_fused_adam_``), so results agree with
``torch.optim.X(fused=True)`` to within an ulp or two. This reference reads ``found_inf``, ``lr_tensor`` and the
steps on the host: it synchronises, which the compiled backends never do.
"""
import math

import torch


def _skip(found_inf):
    return found_inf is not None and bool(found_inf.item())


def _lr(lr, lr_tensor):
    return float(lr_tensor.item()) if lr_tensor is not None else lr


def _opmath(t):
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _unscaled_grad(grad, grad_scale, maximize):
    g = _opmath(grad)
    if grad_scale is not None:
        g = g / grad_scale.to(g.dtype)
        grad.copy_(g)
    return -g if maximize else g


def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor, beta1, beta2, weight_decay,
          eps, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf):
    """Adam (L2 weight decay) or AdamW (``decoupled_weight_decay``), with optional AMSGrad.

    t += 1; g = grad / scale (negated if maximize); AdamW: p -= lr*wd*p, Adam: g += wd*p;
    m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g; vmax = max(vmax, v) if amsgrad;
    p -= (lr / (1 - b1^t)) * m / (sqrt(v or vmax) / sqrt(1 - b2^t) + eps), the bias corrections in float64.
    """
    if _skip(found_inf):
        return
    lr = _lr(lr, lr_tensor)
    for i, param in enumerate(params):
        steps[i] += 1
        step = float(steps[i].item())
        g = _unscaled_grad(grads[i], grad_scale, maximize)
        p = _opmath(param)
        if weight_decay != 0:
            if decoupled_weight_decay:
                p = p - lr * weight_decay * p
            else:
                g = g + weight_decay * p
        m = beta1 * _opmath(exp_avgs[i]) + (1 - beta1) * g
        v = beta2 * _opmath(exp_avg_sqs[i]) + (1 - beta2) * g * g
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        if amsgrad:
            v = torch.maximum(_opmath(max_exp_avg_sqs[i]), v)
            max_exp_avg_sqs[i].copy_(v)
        step_size = lr / (1 - beta1 ** step)
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
        denom = v.sqrt() / bias_correction2_sqrt + eps
        param.copy_(p - step_size * m / denom)


def sgd_(params, grads, momentum_buffers, lr, lr_tensor, momentum, dampening, weight_decay, nesterov, maximize,
         is_first_step, grad_scale, found_inf):
    """SGD with momentum, dampening, Nesterov and L2 weight decay, as torch.optim.SGD.

    g = grad / scale (negated if maximize) + wd*p; with momentum: b = g on the first step, else
    b = momentum*b + (1-dampening)*g, and g = g + momentum*b (nesterov) or g = b; p -= lr*g.
    ``momentum_buffers`` is empty when momentum == 0.
    """
    if _skip(found_inf):
        return
    lr = _lr(lr, lr_tensor)
    for i, param in enumerate(params):
        g = _unscaled_grad(grads[i], grad_scale, maximize)
        p = _opmath(param)
        if weight_decay != 0:
            g = g + weight_decay * p
        if momentum != 0:
            b = g if is_first_step else momentum * _opmath(momentum_buffers[i]) + (1 - dampening) * g
            momentum_buffers[i].copy_(b)
            g = g + momentum * b if nesterov else b
        param.copy_(p - lr * g)


def adagrad_(params, grads, state_sums, steps, lr, lr_tensor, lr_decay, weight_decay, eps, maximize, grad_scale,
             found_inf):
    """Adagrad as torch.optim.Adagrad: t += 1; clr = lr / (1 + (t-1)*lr_decay); g += wd*p; s += g*g;
    p -= clr * g / (sqrt(s) + eps)."""
    if _skip(found_inf):
        return
    lr = _lr(lr, lr_tensor)
    for i, param in enumerate(params):
        steps[i] += 1
        step = float(steps[i].item())
        g = _unscaled_grad(grads[i], grad_scale, maximize)
        p = _opmath(param)
        if weight_decay != 0:
            g = g + weight_decay * p
        s = _opmath(state_sums[i]) + g * g
        state_sums[i].copy_(s)
        clr = lr / (1 + (step - 1) * lr_decay)
        param.copy_(p - clr * g / (s.sqrt() + eps))


def lars_trust_ratio(p, g, weight_decay, trust_coefficient, eps, update_norm):
    """LARS's per-tensor λ = η‖w‖ / (‖g‖ + β‖w‖ + ε) (or η‖w‖ / (‖g + βw‖ + ε) with ``update_norm``), and λ = 1
    when either norm is 0. Norms in float32 (float64 for float64 tensors), from the unscaled gradient."""
    w_norm = p.norm()
    if update_norm:
        g_norm = (g + weight_decay * p).norm()
        ratio = trust_coefficient * w_norm / (g_norm + eps)
    else:
        g_norm = g.norm()
        ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
    return torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))


def lars_(params, grads, momentum_buffers, lr, lr_tensor, momentum, dampening, weight_decay, trust_coefficient, eps,
          nesterov, maximize, trust_clip, update_norm, lr_in_momentum, is_first_step, grad_scale, found_inf):
    """LARS (You, Gitman & Ginsburg 2017) on every tensor given (the optimizer routes excluded ones to sgd_).

    λ = lars_trust_ratio(...); LARC (``trust_clip``): λ = min(λ / lr, 1); d = λ (g + βw);
    default: b = d on the first step, else b = momentum*b + (1-dampening)*d; d = d + momentum*b (nesterov) or b;
    p -= lr*d. ``lr_in_momentum``: the learning rate enters the buffer, b = momentum*b + lr*d (b = lr*d first),
    p -= b (or p -= lr*d + momentum*b with nesterov).
    """
    if _skip(found_inf):
        return
    lr = _lr(lr, lr_tensor)
    for i, param in enumerate(params):
        g = _unscaled_grad(grads[i], grad_scale, maximize)
        p = _opmath(param)
        ratio = lars_trust_ratio(p, g, weight_decay, trust_coefficient, eps, update_norm)
        if trust_clip:
            ratio = torch.clamp(ratio / lr, max=1.0)
        d = ratio * (g + weight_decay * p)
        if lr_in_momentum:
            b = lr * d if is_first_step else momentum * _opmath(momentum_buffers[i]) + lr * d
            momentum_buffers[i].copy_(b)
            param.copy_(p - (lr * d + momentum * b if nesterov else b))
            continue
        if momentum != 0:
            b = d if is_first_step else momentum * _opmath(momentum_buffers[i]) + (1 - dampening) * d
            momentum_buffers[i].copy_(b)
            d = d + momentum * b if nesterov else b
        param.copy_(p - lr * d)
