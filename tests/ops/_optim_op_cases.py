"""Shared cases of the fused optimizer op tests (test_optim.py): sizes, dtypes and options to step with, the tensor
lists a step updates, one step of each op, and the comparisons against the oracle. (Not _optim_cases.py: that is
benchmarks/_optim_cases.py's name, and a run over both folders would import one for the other.)"""
import pytest
import torch

from fastcnn.ops.optim import reference

from _tolerances import assert_lockstep

SIZES = [(1,), (7,), (3, 5, 7), (1000003,)]


SMALL_SIZES = [(1,), (7,), (13, 97)]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
               (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


DTYPE_IDS = ["f32", "f64", "bf16", "bf16-f32state", "f16-f32state"]


STEPS = 4


def each_case(options, shown=lambda value: True):
    """Parametrizes an optimizer test over DEVICES, DTYPE_PAIRS and `options` (ids name the options that are shown)."""
    def parametrize(test):
        test = pytest.mark.parametrize("o", options,
                                       ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items() if shown(v)))(test)
        return pytest.mark.parametrize("device", DEVICES)(pytest.mark.parametrize("dtypes", DTYPE_PAIRS,
                                                                                  ids=DTYPE_IDS)(test))
    return parametrize


def sizes_for(dtypes, o, big_options):
    """Every size (1,000,003 elements too) for float32 params with `big_options`, else the small ones only."""
    return SIZES if dtypes[0] == torch.float32 and o is big_options else SMALL_SIZES


def assert_exact(result, expected, name):
    torch.testing.assert_close(result, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")


class Lists:
    """One set of optimizer lists (params, grads, states, steps) that can be cloned, moved and stepped."""

    def __init__(self, tensors):
        self.t = tensors  # dict: name -> list of tensors (or None)

    @classmethod
    def make(cls, sizes, dtype, state_dtype, device, states, steps=False, state_fill=None, positive_states=()):
        t = {"params": [torch.randn(s, device=device).to(dtype) for s in sizes],
             "grads": [torch.zeros(s, device=device, dtype=dtype) for s in sizes]}
        for name in states:
            make = (lambda s: torch.rand(s, device=device)) if name in positive_states else (
                lambda s: torch.randn(s, device=device) * 0.1)
            t[name] = [(torch.full(s, state_fill, device=device) if state_fill is not None else make(s)).to(state_dtype)
                       for s in sizes]
        if steps:
            t["steps"] = [torch.tensor(float(i % 3), device=device) for i in range(len(sizes))]
        return cls(t)

    def clone(self, dtype=None):
        def conv(x):
            return x.clone() if dtype is None or x.dim() == 0 else x.to(dtype).clone()
        return Lists({k: [conv(x) for x in v] for k, v in self.t.items()})

    def new_grads(self, scale=1.0):
        for g in self.t["grads"]:
            g.copy_(torch.randn(g.shape, device=g.device) * scale)

    def copy_grads_from(self, other):
        for g, h in zip(self.t["grads"], other.t["grads"]):
            g.copy_(h)


def compare(fused, oracle, exact, names=None):
    """exact: bit for bit; else within OPTIM_LOCKSTEP_ULPS (steps always exact)."""
    for name in names or fused.t:
        for i, (a, b) in enumerate(zip(fused.t[name], oracle.t[name])):
            if exact or name == "steps":
                assert_exact(a, b, f"{name}[{i}]")
            else:
                assert_lockstep(a, b, f"{name}[{i}]")


def step_beside_oracle(fused, op, step, steps=STEPS, exact_after_first=None):
    """Steps `fused` with fastcnn::<op> and a clone of it with the oracle, `steps` times on the same fresh gradients;
    ``step(fn, lists, k)`` makes step k with fn. ``exact_after_first``: the tensors that equal the oracle's bit for
    bit after the first step. Returns the oracle's lists."""
    oracle = fused.clone()
    for k in range(steps):
        fused.new_grads()
        oracle.copy_grads_from(fused)
        step(getattr(torch.ops.fastcnn, op), fused, k)
        step(getattr(reference, op), oracle, k)
        if k == 0 and exact_after_first:
            compare(fused, oracle, exact=True, names=exact_after_first)
    return oracle


def run(op, lists, *args):
    op(*lists, *args)


ADAM_OPTIONS = [
    dict(amsgrad=False, maximize=False, decoupled=False, wd=0.0),
    dict(amsgrad=False, maximize=False, decoupled=False, wd=0.1),
    dict(amsgrad=False, maximize=True, decoupled=True, wd=0.1),
    dict(amsgrad=True, maximize=False, decoupled=True, wd=0.01),
    dict(amsgrad=True, maximize=True, decoupled=False, wd=0.0),
]


def adam_args(lists, amsgrad):
    t = lists.t
    return [t["params"], t["grads"], t["exp_avgs"], t["exp_avg_sqs"], t["max_exp_avg_sqs"] if amsgrad else [],
            t["steps"]]


def adam_step(fn, lists, o, lr=1e-3, lr_tensor=None, grad_scale=None, found_inf=None):
    fn(*adam_args(lists, o["amsgrad"]), lr, lr_tensor, 0.9, 0.999, o["wd"], 1e-8, o["amsgrad"], o["maximize"],
       o["decoupled"], grad_scale, found_inf)


def adam_lists(sizes, dtype, state_dtype, device):
    lists = Lists.make(sizes, dtype, state_dtype, device, ["exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"], steps=True,
                       positive_states=("exp_avg_sqs", "max_exp_avg_sqs"))
    return lists


SGD_OPTIONS = [
    dict(momentum=0.0, dampening=0.0, wd=0.0, nesterov=False, maximize=False),
    dict(momentum=0.0, dampening=0.0, wd=1e-2, nesterov=False, maximize=True),
    dict(momentum=0.9, dampening=0.0, wd=1e-4, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.0, wd=0.0, nesterov=True, maximize=False),
    dict(momentum=0.5, dampening=0.3, wd=1e-3, nesterov=False, maximize=True),
]


def sgd_step(fn, lists, o, first, lr=0.05, lr_tensor=None, grad_scale=None, found_inf=None):
    t = lists.t
    bufs = t["momentum_buffers"] if o["momentum"] != 0 else []
    fn(t["params"], t["grads"], bufs, lr, lr_tensor, o["momentum"], o["dampening"], o["wd"], o["nesterov"],
       o["maximize"], first, grad_scale, found_inf)


ADAGRAD_OPTIONS = [dict(lr_decay=0.0, wd=0.0, maximize=False), dict(lr_decay=0.01, wd=0.1, maximize=True)]


def adagrad_step(fn, lists, o, lr=0.1, lr_tensor=None, grad_scale=None, found_inf=None):
    t = lists.t
    fn(t["params"], t["grads"], t["state_sums"], t["steps"], lr, lr_tensor, o["lr_decay"], o["wd"], 1e-10,
       o["maximize"], grad_scale, found_inf)


LARS_OPTIONS = [
    dict(momentum=0.9, dampening=0.0, wd=1e-4, nesterov=False, maximize=False, trust_clip=False, update_norm=False,
         lr_in_momentum=False),
    dict(momentum=0.9, dampening=0.1, wd=5e-4, nesterov=True, maximize=True, trust_clip=True, update_norm=False,
         lr_in_momentum=False),
    dict(momentum=0.9, dampening=0.0, wd=1e-4, nesterov=False, maximize=True, trust_clip=False, update_norm=True,
         lr_in_momentum=True),
    dict(momentum=0.9, dampening=0.0, wd=1e-4, nesterov=True, maximize=False, trust_clip=True, update_norm=True,
         lr_in_momentum=True),
    dict(momentum=0.0, dampening=0.0, wd=0.0, nesterov=False, maximize=False, trust_clip=False, update_norm=False,
         lr_in_momentum=False),
]


def lars_step(fn, lists, o, first, lr=0.5, lr_tensor=None, grad_scale=None, found_inf=None):
    t = lists.t
    bufs = t["momentum_buffers"] if o["momentum"] != 0 or o["lr_in_momentum"] else []
    fn(t["params"], t["grads"], bufs, lr, lr_tensor, o["momentum"], o["dampening"], o["wd"], 1e-3, 1e-8,
       o["nesterov"], o["maximize"], o["trust_clip"], o["update_norm"], o["lr_in_momentum"], first, grad_scale,
       found_inf)


def all_ops(device, dtype=torch.float32):
    """(name, fused lists, oracle lists, step(fn, lists, **kw)) for one configuration of each op."""
    sizes = [(7,), (4099,)]
    adam_o, sgd_o, ada_o, lars_o = ADAM_OPTIONS[3], SGD_OPTIONS[4], ADAGRAD_OPTIONS[1], LARS_OPTIONS[1]
    cases = [
        ("adam_", adam_lists(sizes, dtype, dtype, device), lambda fn, ls, **kw: adam_step(fn, ls, adam_o, **kw)),
        ("sgd_", Lists.make(sizes, dtype, dtype, device, ["momentum_buffers"]),
         lambda fn, ls, **kw: sgd_step(fn, ls, sgd_o, False, **kw)),
        ("adagrad_", Lists.make(sizes, dtype, dtype, device, ["state_sums"], steps=True, state_fill=0.1),
         lambda fn, ls, **kw: adagrad_step(fn, ls, ada_o, **kw)),
        ("lars_", Lists.make(sizes, dtype, dtype, device, ["momentum_buffers"]),
         lambda fn, ls, **kw: lars_step(fn, ls, lars_o, False, **kw)),
    ]
    return cases

