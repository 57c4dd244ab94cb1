"""Shared by the optimizer tests: the backends that can run an optimizer op here, and a lockstep run of a fastcnn
optimizer beside torch.optim's fused one (and, optionally, a float64 oracle: fastcnn's reference in float64)."""
import copy

import torch

import fastcnn
from fastcnn.ops import optim as optim_ops

from _tolerances import assert_close_to_oracle, assert_lockstep

SHAPES = [(7,), (13, 5), (3, 4, 5)]
TINY_SHAPES = [(7,), (3, 5)]
OP_OF = {"Adam": "adam_", "AdamW": "adam_", "SGD": "sgd_", "Adagrad": "adagrad_", "LARS": "lars_"}
STATE_KEYS = {"Adam": ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), "SGD": ("momentum_buffer",),
              "Adagrad": ("step", "sum"), "LARS": ("momentum_buffer",)}
STATE_KEYS["AdamW"] = STATE_KEYS["Adam"]


def backends(op, device_type="cpu"):
    """The backends that can run fastcnn::op on device_type tensors here."""
    return [b for b in fastcnn.BACKENDS if optim_ops.why_unavailable(op, b, device_type) is None]


def backend_params(op, device_type="cpu"):
    import pytest
    return [pytest.param(b, id=b) for b in backends(op, device_type)]


def steps_for(backend, steps=100):
    """Triton runs under its (slow) interpreter on CPU: fewer steps, on tiny tensors."""
    return (5, TINY_SHAPES) if backend == "triton" and not torch.cuda.is_available() else (steps, SHAPES)


def fresh_kwargs(kwargs, device="cpu"):
    """The options with a tensor lr cloned (each optimizer owns its own)."""
    return {k: (v.clone().to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}


def make_params(shapes, dtype, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]


def set_grads(param_lists, gen, scale=1.0):
    """The same random gradient on the i-th param of every list."""
    for group in zip(*param_lists):
        g = torch.randn(group[0].shape, generator=gen, dtype=torch.float64) * scale
        for p in group:
            p.grad = g.to(device=p.device, dtype=p.dtype)


def compare_states(ours, stock, params_ours, params_stock, keys, check):
    for i, (a, b) in enumerate(zip(params_ours, params_stock)):
        check(a.detach(), b.detach(), f"param {i}")
        for key in keys:
            if key in stock.state[b]:
                sa, sb = ours.state[a][key], stock.state[b][key]
                if key == "step":
                    assert sa.dtype == torch.float32 and sa.device == a.device and sa.dim() == 0
                    assert sa.item() == sb.item(), f"param {i} step {sa.item()} != {sb.item()}"
                else:
                    check(sa.to(sb.dtype), sb, f"param {i} {key}")


def run_lockstep(name, kwargs, backend, steps, shapes, dtype=torch.float32, device="cpu", exact_order=True,
                 ours_kwargs=None, stock_cls=None):
    """Steps fastcnn.optim.<name> and torch.optim.<name>(fused=True) on the same gradients. With ``exact_order``,
    every param and state tensor agrees within OPTIM_LOCKSTEP_ULPS at every step; otherwise (a known difference in
    op order or precision) the final params are as close to a float64 oracle (fastcnn's reference in float64) as
    the flash-attention rule asks: at most twice torch's error."""
    init = make_params(shapes, dtype, device)
    p_ours = [p.clone().requires_grad_() for p in init]
    p_stock = [p.clone().requires_grad_() for p in init]
    p_oracle = [p.double().requires_grad_() for p in init]
    cls = getattr(fastcnn.optim, name)
    ours = cls(p_ours, **fresh_kwargs(kwargs, device), **(ours_kwargs or {}))
    stock = (stock_cls or getattr(torch.optim, name))(p_stock, fused=True, **fresh_kwargs(kwargs, device))
    oracle = None if exact_order else cls(p_oracle, **fresh_kwargs(kwargs, device))
    gen = torch.Generator().manual_seed(1)
    keys = STATE_KEYS[name]
    for _ in range(steps):
        set_grads([p_ours, p_stock, p_oracle], gen)
        with fastcnn.use_backend(backend):
            ours.step()
        stock.step()
        if exact_order:
            compare_states(ours, stock, p_ours, p_stock, keys, assert_lockstep)
        else:
            with fastcnn.use_backend("reference"):
                oracle.step()
    if not exact_order:
        for i, (a, b, c) in enumerate(zip(p_ours, p_stock, p_oracle)):
            assert_close_to_oracle(a.detach(), b.detach(), c.detach(), f"param {i}")
    return ours, stock, p_ours, p_stock


def clone_optimizer_state(optimizer):
    return copy.deepcopy(optimizer.state_dict())
