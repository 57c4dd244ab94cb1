"""torch.amp.GradScaler (unscale in the op, skip on inf) and torch.compile(fullgraph=True) over a training step."""
import copy

import pytest
import torch
from _lockstep import backends

import fastcnn

from _tolerances import assert_lockstep

OPTIMIZERS = [
    ("Adam", dict(lr=1e-2, amsgrad=True)),
    ("AdamW", dict(lr=torch.tensor(1e-2))),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("Adagrad", dict(lr=0.1)),
    ("LARS", dict(lr=0.5, weight_decay=1e-3)),
]
IDS = [name for name, _ in OPTIMIZERS]
OP_OF = {"Adam": "adam_", "AdamW": "adam_", "SGD": "sgd_", "Adagrad": "adagrad_", "LARS": "lars_"}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def _kwargs(kwargs):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=IDS)
def test_grad_scaler(name, kwargs):
    """Finite gradients: the scaled step equals the unscaled one (power-of-two scale: exact unscaling). An inf
    gradient: params, state and step are unchanged, and the scaler backs off."""
    for backend in backends(OP_OF[name]):
        model, plain = _model(), _model()
        opt = getattr(fastcnn.optim, name)(model.parameters(), **_kwargs(kwargs))
        ref = getattr(fastcnn.optim, name)(plain.parameters(), **_kwargs(kwargs))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1000)
        x = torch.randn(8, 5)
        with fastcnn.use_backend(backend):
            for step in range(3):
                scaler.scale(model(x).square().mean()).backward()
                plain(x).square().mean().backward()
                scaler.step(opt)
                scaler.update()
                ref.step()
                opt.zero_grad()
                ref.zero_grad()
                for a, b in zip(model.parameters(), plain.parameters()):
                    assert_lockstep(a.detach(), b.detach(), f"{name} step {step}")
            assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
            before = _snapshot(model, opt)
            scaler.scale(model(x).square().mean()).backward()
            next(model.parameters()).grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        after = _snapshot(model, opt)
        for a, b in zip(before[0], after[0]):
            assert torch.equal(a, b)
        for index, state in before[1].items():
            for key, value in state.items():
                assert torch.equal(value, after[1][index][key]), key
        assert scaler.get_scale() == 2.0 ** 11


def _train_step(model, opt, x):
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    return loss.detach()


def _compiled(fn, backend):
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    if hasattr(torch._dynamo.config, "trace_autograd_ops"):  # torch >= 2.12: Tensor.backward() inside the graph
        def run(*args):
            with torch._dynamo.config.patch(trace_autograd_ops=True):
                return compiled(*args)
        return run, True
    return compiled, False


def _compile_cases():
    """Each optimizer on the backend it gets by default on CPU tensors, plus Adam and LARS on the reference backend
    when that is not the default (the Triton interpreter touches tensor data, which fake tensors do not have)."""
    cases = []
    for name, kwargs in OPTIMIZERS:
        usable = [b for b in backends(OP_OF[name]) if b != "triton" or torch.cuda.is_available()]
        default = usable[0]
        cases.append(pytest.param(name, kwargs, default, "aot_eager", id=f"{name}-{default}-aot_eager"))
        if name in ("Adam", "LARS") and default != "reference":
            cases.append(pytest.param(name, kwargs, "reference", "aot_eager", id=f"{name}-reference-aot_eager"))
        if name == "AdamW":  # inductor (a C++ build per graph on CPU): once, to keep the suite fast
            cases.append(pytest.param(name, kwargs, default, "inductor", id=f"{name}-{default}-inductor"))
    return cases


@pytest.mark.parametrize("name,kwargs,backend,compile_backend", _compile_cases())
def test_compile_fullgraph_training_step(name, kwargs, backend, compile_backend):
    """forward + backward + opt.step() under torch.compile(fullgraph=True) (no graph break) equals eager."""
    torch._dynamo.reset()
    model, eager_model = _model(), _model()
    opt = getattr(fastcnn.optim, name)(model.parameters(), **_kwargs(kwargs))
    eager = getattr(fastcnn.optim, name)(eager_model.parameters(), **_kwargs(kwargs))
    x = torch.randn(8, 5)
    with fastcnn.use_backend(backend):
        step, whole = _compiled(_train_step, compile_backend)
        if not whole:  # older torch: backward stays eager, the optimizer step is compiled
            compiled_opt_step, _ = _compiled(opt.step, compile_backend)

            def step(model, opt, x):
                loss = model(x).square().mean()
                loss.backward()
                compiled_opt_step()
                return loss.detach()
        for _ in range(3):
            loss = step(model, opt, x)
            eager_loss = _train_step(eager_model, eager, x)
            opt.zero_grad()  # (dynamo does not trace Optimizer.zero_grad)
            eager.zero_grad()
            torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
