"""state_dict compatibility with torch.optim in both directions, and checkpoint -> resume giving a bitwise-identical
trajectory."""
import copy
import io

import pytest
import torch
from _lockstep import SHAPES, make_params, set_grads

import fastcnn

from _tolerances import assert_close_to_oracle, assert_lockstep

CASES = [
    ("AdamW", dict(lr=1e-2, amsgrad=True)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01)),
]


def _pair(name, kwargs, source, target):
    """Two optimizers on copies of the same params: (source class, target class) from fastcnn.optim / torch.optim."""
    init = make_params(SHAPES, torch.float32)
    p_src = [p.clone().requires_grad_() for p in init]
    return p_src, getattr(source, name)(p_src, **kwargs)


def _steps(params_and_opts, n, gen):
    for _ in range(n):
        set_grads([p for p, _ in params_and_opts], gen)
        for _, opt in params_and_opts:
            opt.step()


def _exact(name, kwargs):
    return not (name == "AdamW" or kwargs.get("decoupled_weight_decay")) or kwargs.get("weight_decay", 1) == 0


@pytest.mark.parametrize("direction", ["torch_to_fastcnn", "fastcnn_to_torch"])
@pytest.mark.parametrize("name,kwargs", CASES, ids=[c[0] for c in CASES])
def test_round_trip_continues_the_trajectory(name, kwargs, direction):
    """Run 10 steps with one library, save, load into the other (fresh params copied over), then 20 more steps
    each: the continuation matches the first library's own continuation. torch's default (non-fused) path keeps
    `step` on the CPU; fastcnn moves it to the param's device as float32."""
    source, target = (torch.optim, fastcnn.optim) if direction == "torch_to_fastcnn" else (fastcnn.optim, torch.optim)
    p_src, src = _pair(name, kwargs, source, target)
    gen = torch.Generator().manual_seed(3)
    _steps([(p_src, src)], 10, gen)
    saved = copy.deepcopy(src.state_dict())  # as a checkpoint: torch's loader may alias the given tensors
    p_dst = [p.detach().clone().requires_grad_() for p in p_src]
    dst = getattr(target, name)(p_dst, **kwargs)
    dst.load_state_dict(copy.deepcopy(saved))
    for a, b in zip(p_src, p_dst):
        for key, value in src.state[a].items():
            assert torch.equal(dst.state[b][key].cpu().float(), value.cpu().float()), key
            if key == "step" and target is fastcnn.optim:
                assert dst.state[b][key].dtype == torch.float32 and dst.state[b][key].device == b.device
    assert dst.state_dict()["param_groups"] == saved["param_groups"]
    p_oracle = [p.detach().double().requires_grad_() for p in p_src]
    oracle = getattr(fastcnn.optim, name)(p_oracle, **kwargs)
    oracle.load_state_dict(copy.deepcopy(saved))
    for _ in range(20):
        set_grads([p_src, p_dst, p_oracle], gen)
        src.step()
        dst.step()
        with fastcnn.use_backend("reference"):
            oracle.step()
        for a, b in zip(p_src, p_dst):
            if _exact(name, kwargs):
                assert_lockstep(b.detach(), a.detach(), name)
    for a, b, c in zip(p_src, p_dst, p_oracle):
        assert_close_to_oracle(b.detach(), a.detach(), c.detach(), name)


@pytest.mark.parametrize("name,kwargs", CASES + [("LARS", dict(lr=0.5, weight_decay=1e-3))],
                         ids=[c[0] for c in CASES] + ["LARS"])
def test_checkpoint_resume_is_bitwise(name, kwargs):
    init = make_params(SHAPES, torch.float32)
    p_run = [p.clone().requires_grad_() for p in init]
    run = getattr(fastcnn.optim, name)(p_run, **kwargs)
    gen = torch.Generator().manual_seed(5)
    _steps([(p_run, run)], 10, gen)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in p_run], "optim": run.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    p_resumed = [p.clone().requires_grad_() for p in checkpoint["params"]]
    resumed = getattr(fastcnn.optim, name)(p_resumed, **kwargs)
    resumed.load_state_dict(checkpoint["optim"])
    _steps([(p_run, run), (p_resumed, resumed)], 10, gen)
    for a, b in zip(p_run, p_resumed):
        assert torch.equal(a, b)
        for key, value in run.state[a].items():
            assert torch.equal(value, resumed.state[b][key]), key


def test_state_dtype_survives_load():
    """With state_dtype=float32, loading keeps the saved fp32 moments in fp32 (torch's loader alone would round them
    to the bfloat16 param dtype)."""
    params = [torch.randn(13, 5, dtype=torch.bfloat16, requires_grad=True)]
    opt = fastcnn.optim.AdamW(params, lr=1e-2, state_dtype=torch.float32)
    params[0].grad = torch.randn_like(params[0])
    opt.step()
    saved = opt.state_dict()
    again = fastcnn.optim.AdamW(params, lr=1e-2, state_dtype=torch.float32)
    again.load_state_dict(saved)
    for key in ("exp_avg", "exp_avg_sq"):
        assert again.state[params[0]][key].dtype == torch.float32
        assert torch.equal(again.state[params[0]][key], saved["state"][0][key])


def test_lr_scheduler_compatibility():
    params = [torch.randn(7, requires_grad=True)]
    opt = fastcnn.optim.SGD(params, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(4):
        params[0].grad = torch.ones_like(params[0])
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
