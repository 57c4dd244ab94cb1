"""LARS against an independent, plainly written per-parameter implementation (timm-style loop) in float64 and
float32, the exclusion of ndim <= 1 params, the options, and the warmup + polynomial-decay schedule."""
import itertools

import pytest
import torch
from _lockstep import SHAPES, backend_params, make_params, set_grads, steps_for

import fastcnn

from _tolerances import assert_close_to_oracle


def plain_lars(params, bufs, lr, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
               trust_coefficient=0.001, eps=1e-8, trust_clip=False, trust_norm="weight", lr_in_momentum=False,
               maximize=False, exclude=lambda p: p.ndim <= 1):
    """One LARS step, one parameter at a time, as timm's Lars loop (written here independently of fastcnn)."""
    for i, p in enumerate(params):
        g = -p.grad if maximize else p.grad
        if exclude(p):
            d, scale_lr_in_buffer = g, False
        else:
            w_norm = torch.linalg.vector_norm(p)
            if trust_norm == "update":
                g_norm = torch.linalg.vector_norm(g + weight_decay * p)
                trust = trust_coefficient * w_norm / (g_norm + eps)
            else:
                g_norm = torch.linalg.vector_norm(g)
                trust = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
            trust = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
            if trust_clip:
                trust = torch.clamp(trust / lr, max=1.0)
            d, scale_lr_in_buffer = (g + weight_decay * p) * trust, lr_in_momentum
        if scale_lr_in_buffer:
            bufs[i] = lr * d if bufs[i] is None else momentum * bufs[i] + lr * d
            p.sub_(lr * d + momentum * bufs[i] if nesterov else bufs[i])
            continue
        if momentum != 0:
            bufs[i] = d.clone() if bufs[i] is None else momentum * bufs[i] + (1 - dampening) * d
            d = d + momentum * bufs[i] if nesterov else bufs[i]
        p.sub_(lr * d)


OPTIONS = [dict(weight_decay=wd, nesterov=nest, trust_clip=clip, trust_norm=norm)
           for wd, nest, clip, norm in itertools.product([0.0, 1e-3], [False, True], [False, True],
                                                         ["weight", "update"])]
OPTIONS += [dict(weight_decay=1e-3, lr_in_momentum=True), dict(weight_decay=1e-3, lr_in_momentum=True, nesterov=True),
            dict(momentum=0.0, weight_decay=1e-3), dict(dampening=0.5, weight_decay=1e-3),
            dict(trust_coefficient=0.02, eps=0.0, weight_decay=5e-4), dict(weight_decay=1e-3, maximize=True),
            dict(weight_decay=1e-3, maximize=True, trust_clip=True, nesterov=True, trust_norm="update")]


@pytest.mark.parametrize("backend", backend_params("lars_"))
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_lars_against_plain_loop(backend, options):
    steps, shapes = steps_for(backend, 50)
    init = make_params(shapes, torch.float32)
    ours_p = [p.clone().requires_grad_() for p in init]
    stock_p = [p.clone() for p in init]
    oracle_p = [p.double() for p in init]
    lr = 0.5
    opt = fastcnn.optim.LARS(ours_p, lr=lr, **options)
    stock_bufs, oracle_bufs = [None] * len(init), [None] * len(init)
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        set_grads([ours_p, stock_p, oracle_p], gen)
        with fastcnn.use_backend(backend):
            opt.step()
        plain_lars(stock_p, stock_bufs, lr, **options)
        plain_lars(oracle_p, oracle_bufs, lr, **options)
    for i, (a, b, c) in enumerate(zip(ours_p, stock_p, oracle_p)):
        assert_close_to_oracle(a.detach(), b, c, f"param {i}")
        if "momentum_buffer" in opt.state[a]:
            assert_close_to_oracle(opt.state[a]["momentum_buffer"], stock_bufs[i], oracle_bufs[i], f"buffer {i}")


def test_lars_exclusion():
    """ndim <= 1 params get plain SGD-momentum without weight decay or trust ratio; a custom ``exclude`` works."""
    w, b = torch.randn(13, 5, requires_grad=True), torch.randn(7, requires_grad=True)
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = fastcnn.optim.LARS([w, b], lr=0.1, momentum=0.0, weight_decay=0.1)
    w.grad, b.grad = torch.zeros_like(w), torch.ones_like(b)
    opt.step()
    torch.testing.assert_close(b.detach(), b0 - 0.1, rtol=0, atol=1e-7)  # no wd, λ = 1
    lam = 0.001 * w0.norm() / (0.1 * w0.norm() + 1e-8)  # g = 0: ‖g‖ = 0 -> λ = 1
    assert lam != 1
    torch.testing.assert_close(w.detach(), w0 - 0.1 * (0.1 * w0))
    c = torch.randn(3, 4, requires_grad=True)
    c0 = c.detach().clone()
    opt = fastcnn.optim.LARS([c], lr=0.1, momentum=0.0, weight_decay=0.1, exclude=lambda p: True)
    c.grad = torch.ones_like(c)
    opt.step()
    torch.testing.assert_close(c.detach(), c0 - 0.1)


def test_lars_reference_formula_one_step():
    """First step, no momentum history: w' = w − lr·λ·(g + βw), λ = η‖w‖/(‖g‖ + β‖w‖ + ε)."""
    torch.manual_seed(0)
    w, g = torch.randn(13, 5, dtype=torch.float64), torch.randn(13, 5, dtype=torch.float64)
    p = w.clone().requires_grad_()
    p.grad = g.clone()
    opt = fastcnn.optim.LARS([p], lr=2.0, weight_decay=1e-2, trust_coefficient=0.01, eps=1e-6)
    opt.step()
    lam = 0.01 * w.norm() / (g.norm() + 1e-2 * w.norm() + 1e-6)
    torch.testing.assert_close(p.detach(), w - 2.0 * lam * (g + 1e-2 * w))
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], lam * (g + 1e-2 * w))


def test_lars_defaults_and_state_dict_keys():
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    opt = fastcnn.optim.LARS(params, lr=1.0)
    group = opt.param_groups[0]
    assert (group["momentum"], group["trust_coefficient"], group["eps"], group["trust_norm"]) == (0.9, 0.001, 1e-8,
                                                                                                  "weight")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(set(s) == {"momentum_buffer"} for s in opt.state_dict()["state"].values())


def test_warmup_polynomial_decay_schedule():
    p = torch.zeros(3, requires_grad=True)
    opt = fastcnn.optim.LARS([p], lr=2.0)
    sched = fastcnn.optim.warmup_polynomial_decay(opt, warmup_steps=4, total_steps=10, power=2.0)
    expected = [0.5, 1.0, 1.5, 2.0,  # linear warmup: base·(t+1)/4
                2.0, 2.0 * (5 / 6) ** 2, 2.0 * (4 / 6) ** 2, 2.0 * (3 / 6) ** 2, 2.0 * (2 / 6) ** 2,
                2.0 * (1 / 6) ** 2, 0.0, 0.0]
    seen = []
    for _ in expected:
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError, match="total_steps"):
        fastcnn.optim.warmup_polynomial_decay(opt, warmup_steps=5, total_steps=5)
