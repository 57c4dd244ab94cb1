"""The fused optimizer ops fastcnn::adam_, sgd_, adagrad_, lars_ (C++ kernels of fastcnn._C, called directly through
torch.ops) against the plain-PyTorch oracle fastcnn.ops.optim.reference and against torch.optim's fused optimizers;
then the edge cases: the baseline (non-AVX2) CPU loops, bad inputs, and (on a GPU) several dtype signatures in one call
and CUDA-graph capture. The Triton launchers: test_optim_triton.py.

The kernels replicate the oracle's order of operations, one rounding per operation. SGD therefore equals it bit for
bit in every dtype. Adam and Adagrad take a square root, which the kernels round correctly (IEEE sqrt, as torch's
fused kernels do) while the oracle's tensor.sqrt() on CPU may be an ulp off (a vectorised approximation): their states
equal the oracle's exactly after one step, and every tensor stays within OPTIM_LOCKSTEP_ULPS over several steps. LARS
sums its norms in another order (float64 partials), so it is held to the tolerance table against a float64 run of the
oracle. Every test steps several times with fresh gradients, on odd sizes.
"""
import os
import subprocess
import sys

import pytest
import torch

from fastcnn import _extension
from fastcnn.ops.optim import reference

from _optim_op_cases import (ADAGRAD_OPTIONS, ADAM_OPTIONS, DEVICES, DTYPE_PAIRS, LARS_OPTIONS, Lists, SGD_OPTIONS,
                             STEPS, adagrad_step, adam_lists, adam_step, all_ops, compare, each_case, lars_step,
                             sgd_step, sizes_for, step_beside_oracle)
from _tolerances import assert_close_to_oracle

pytestmark = pytest.mark.skipif(not _extension.LOADED or not hasattr(torch.ops.fastcnn, "adam_"),
                                reason="fastcnn._C with the optimizer ops is not built")


# ---------------------------------------------------------------------------------------------------------------
# Adam / AdamW / AMSGrad


@each_case(ADAM_OPTIONS)
def test_adam_equals_oracle(device, dtypes, o):
    sizes = sizes_for(dtypes, o, ADAM_OPTIONS[2])
    fused = adam_lists(sizes, *dtypes, device)
    oracle = step_beside_oracle(fused, "adam_", lambda fn, lists, k: adam_step(fn, lists, o),
                                exact_after_first=["grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"])
    compare(fused, oracle, exact=False)


# ---------------------------------------------------------------------------------------------------------------
# SGD


@each_case(SGD_OPTIONS)
def test_sgd_equals_oracle(device, dtypes, o):
    sizes = sizes_for(dtypes, o, SGD_OPTIONS[2])
    # The buffers start as NaN: the first step must not read them.
    fused = Lists.make(sizes, *dtypes, device, ["momentum_buffers"], state_fill=float("nan"))
    oracle = step_beside_oracle(fused, "sgd_", lambda fn, lists, k: sgd_step(fn, lists, o, k == 0))
    compare(fused, oracle, exact=True)


# ---------------------------------------------------------------------------------------------------------------
# Adagrad


@each_case(ADAGRAD_OPTIONS)
def test_adagrad_equals_oracle(device, dtypes, o):
    sizes = sizes_for(dtypes, o, ADAGRAD_OPTIONS[1])
    fused = Lists.make(sizes, *dtypes, device, ["state_sums"], steps=True, state_fill=0.1)
    oracle = step_beside_oracle(fused, "adagrad_", lambda fn, lists, k: adagrad_step(fn, lists, o),
                                exact_after_first=["grads", "state_sums", "steps"])
    compare(fused, oracle, exact=False)


# ---------------------------------------------------------------------------------------------------------------
# LARS: held to the tolerance table against a float64 run of the oracle (the norms sum in another order).


@each_case(LARS_OPTIONS, shown=bool)
def test_lars_close_to_oracle(device, dtypes, o):
    sizes = sizes_for(dtypes, o, LARS_OPTIONS[1])
    fused = Lists.make(sizes, *dtypes, device, ["momentum_buffers"], state_fill=float("nan"))
    fused.t["params"].append(torch.zeros(5, device=device, dtype=dtypes[0]))  # |w| = 0: ratio 1
    fused.t["grads"].append(torch.zeros(5, device=device, dtype=dtypes[0]))
    fused.t["momentum_buffers"].append(torch.zeros(5, device=device, dtype=dtypes[1]))
    stock, oracle = fused.clone(), fused.clone(torch.float64)
    for step in range(STEPS):
        fused.new_grads()
        stock.copy_grads_from(fused)
        oracle.copy_grads_from(fused)
        lars_step(torch.ops.fastcnn.lars_, fused, o, step == 0)
        lars_step(reference.lars_, stock, o, step == 0)
        lars_step(reference.lars_, oracle, o, step == 0)
        # Keep the three on the same trajectory (low precision drifts apart otherwise): restart all from the result.
        for name in ("params", "momentum_buffers"):
            for a, b, c in zip(fused.t[name], stock.t[name], oracle.t[name]):
                assert_close_to_oracle(a, b, c, f"{name} (step {step})")
                b.copy_(a)
                c.copy_(a)
    assert all(torch.equal(g, h.to(g.dtype)) for g, h in zip(fused.t["grads"], stock.t["grads"]))


def test_lars_is_deterministic_across_thread_counts():
    o = LARS_OPTIONS[0]
    base = Lists.make([(1000003,), (4099,)], torch.float32, torch.float32, "cpu", ["momentum_buffers"])
    base.new_grads()
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            lists = base.clone()
            lars_step(torch.ops.fastcnn.lars_, lists, o, False)
            results.append(lists)
    finally:
        torch.set_num_threads(threads)
    compare(results[0], results[1], exact=True)


# ---------------------------------------------------------------------------------------------------------------
# lr_tensor, grad_scale, found_inf on every op


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["adam_", "sgd_", "adagrad_", "lars_"])
def test_lr_tensor_and_grad_scale(device, op):
    name, fused, step = next(c for c in all_ops(device) if c[0] == op)
    oracle = fused.clone()
    for k in range(STEPS):
        fused.new_grads(scale=1024.0)
        oracle.copy_grads_from(fused)
        # a power of two and a scale whose reciprocal is inexact (the gradient is divided, not multiplied)
        kw = dict(lr_tensor=torch.tensor(0.01 * (k + 1), device=device),
                  grad_scale=torch.tensor(1024.0 if k % 2 else 3.0, device=device))
        step(getattr(torch.ops.fastcnn, op), fused, **kw)
        step(getattr(reference, op), oracle, **kw)
    # the unscaled gradients written back are exact; the rest as in the per-op tests
    compare(fused, oracle, exact=True, names=["grads"])
    compare(fused, oracle, exact=op == "sgd_", names=[k for k in fused.t if k != "grads"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["adam_", "sgd_", "adagrad_", "lars_"])
def test_found_inf_changes_nothing(device, op):
    name, fused, step = next(c for c in all_ops(device) if c[0] == op)
    fused.new_grads()
    before = fused.clone()
    step(getattr(torch.ops.fastcnn, op), fused, grad_scale=torch.tensor(4.0, device=device),
         found_inf=torch.tensor(1.0, device=device))
    compare(fused, before, exact=True)
    # found_inf = 0 steps normally
    step(getattr(torch.ops.fastcnn, op), fused, found_inf=torch.tensor(0.0, device=device))
    assert not torch.equal(fused.t["params"][1], before.t["params"][1])
    if "steps" in fused.t:
        assert all(s.item() == b.item() + 1 for s, b in zip(fused.t["steps"], before.t["steps"]))


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_and_empty_tensors(device):
    o = ADAM_OPTIONS[1]
    sizes = [(2, 3, 5, 7), (0,), (4, 0, 3)]
    fused = adam_lists(sizes, torch.float32, torch.float32, device)
    for k in fused.t:
        if k != "steps":
            fused.t[k][0] = fused.t[k][0].contiguous(memory_format=torch.channels_last)
    oracle = step_beside_oracle(fused, "adam_", lambda fn, lists, k: adam_step(fn, lists, o), steps=2)
    compare(fused, oracle, exact=False)
    assert fused.t["params"][0].is_contiguous(memory_format=torch.channels_last)
    assert [s.item() for s in fused.t["steps"]] == [2.0, 3.0, 4.0]  # empty tensors still count their steps


def test_empty_lists_are_a_no_op():
    # With no tensor at all the dispatcher has no device to pick a kernel by; a 0-dim lr_tensor gives it one.
    lr = torch.tensor(0.1)
    torch.ops.fastcnn.adam_([], [], [], [], [], [], 1e-3, lr, 0.9, 0.999, 0.0, 1e-8, False, False, False, None, None)
    torch.ops.fastcnn.sgd_([], [], [], 0.1, lr, 0.0, 0.0, 0.0, False, False, True, None, None)
    torch.ops.fastcnn.adagrad_([], [], [], [], 0.1, lr, 0.0, 0.0, 1e-10, False, None, None)
    torch.ops.fastcnn.lars_([], [], [], 0.1, lr, 0.9, 0.0, 0.0, 1e-3, 0.0, False, False, False, False, False, True,
                            None, None)


def test_step_in_float64_and_large_step():
    o = ADAM_OPTIONS[0]
    fused = adam_lists([(33,)], torch.float32, torch.float32, "cpu")
    fused.t["steps"] = [torch.tensor(12345.0, dtype=torch.float64)]
    oracle = fused.clone()
    fused.new_grads()
    oracle.copy_grads_from(fused)
    adam_step(torch.ops.fastcnn.adam_, fused, o)
    adam_step(reference.adam_, oracle, o)
    compare(fused, oracle, exact=False)
    assert fused.t["steps"][0].dtype == torch.float64 and fused.t["steps"][0].item() == 12346.0


# ---------------------------------------------------------------------------------------------------------------
# Lockstep with torch.optim's fused CPU optimizers (same rules, torch's own op order: within the tolerance table).
def _lockstep(torch_opt_cls, kwargs, fastcnn_step, state_names, sizes=((1000003,), (7,), (3, 5)), steps=5):
    params = [torch.randn(s) for s in sizes]
    ref_params = [p.clone().requires_grad_() for p in params]
    oracle_params = [p.double().requires_grad_() for p in params]
    opt = torch_opt_cls(ref_params, fused=True, **kwargs)
    oracle_opt = torch_opt_cls(oracle_params, foreach=False, **kwargs)
    for _ in range(steps):
        grads = [torch.randn(s) for s in sizes]
        for p, g in zip(ref_params, grads):
            p.grad = g.clone()
        for p, g in zip(oracle_params, grads):
            p.grad = g.double()
        opt.step()
        oracle_opt.step()
        fastcnn_step(params, grads)
    for p, r, o in zip(params, ref_params, oracle_params):
        assert_close_to_oracle(p, r.detach(), o.detach(), "param")
    return opt


def test_adam_matches_torch_fused_adamw():
    state = {}

    def step(params, grads):
        if not state:
            state.update(m=[torch.zeros_like(p) for p in params], v=[torch.zeros_like(p) for p in params],
                         vmax=[torch.zeros_like(p) for p in params], t=[torch.tensor(0.0) for _ in params])
        torch.ops.fastcnn.adam_(params, grads, state["m"], state["v"], state["vmax"], state["t"], 1e-2, None, 0.9,
                                0.99, 0.1, 1e-8, True, False, True, None, None)

    _lockstep(torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, amsgrad=True), step, [])


def test_adam_matches_torch_fused_adam():
    state = {}

    def step(params, grads):
        if not state:
            state.update(m=[torch.zeros_like(p) for p in params], v=[torch.zeros_like(p) for p in params],
                         t=[torch.tensor(0.0) for _ in params])
        torch.ops.fastcnn.adam_(params, grads, state["m"], state["v"], [], state["t"], 1e-3, None, 0.9, 0.999,
                                1e-2, 1e-8, False, True, False, None, None)

    _lockstep(torch.optim.Adam, dict(lr=1e-3, weight_decay=1e-2, maximize=True), step, [])


def test_sgd_matches_torch_fused_sgd():
    state = {"first": True}

    def step(params, grads):
        if "b" not in state:
            state["b"] = [torch.empty_like(p) for p in params]
        torch.ops.fastcnn.sgd_(params, grads, state["b"], 0.05, None, 0.9, 0.1, 1e-4, False, False, state["first"],
                               None, None)
        state["first"] = False

    _lockstep(torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-4), step, [])


def test_adagrad_matches_torch_fused_adagrad():
    state = {}

    def step(params, grads):
        if not state:
            state.update(s=[torch.full_like(p, 0.1) for p in params], t=[torch.tensor(0.0) for _ in params])
        torch.ops.fastcnn.adagrad_(params, grads, state["s"], state["t"], 0.1, None, 0.01, 1e-3, 1e-10, False, None,
                                   None)

    _lockstep(torch.optim.Adagrad, dict(lr=0.1, lr_decay=0.01, weight_decay=1e-3, initial_accumulator_value=0.1),
              step, [])


# ---------------------------------------------------------------------------------------------------------------
# The baseline (non-AVX2) loops, selected by ATEN_CPU_CAPABILITY=default in a fresh process.
_BASELINE_SCRIPT = r"""
import torch, fastcnn
from fastcnn.ops.optim import reference as ref
torch.manual_seed(0)
def make(n, dt, st, k):
    return [[torch.randn(n).to(dt)], [torch.randn(n).to(dt)]] + [[torch.rand(n).to(st)] for _ in range(k)]
def clone(ls):
    return [[t.clone() for t in l] for l in ls]
for dt, st in [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)]:
    a = make(1031, dt, st, 3) + [[torch.tensor(2.0)]]
    b = clone(a)
    args = (1e-3, None, 0.9, 0.999, 0.1, 1e-8, True, True, True, torch.tensor(2.0), None)
    torch.ops.fastcnn.adam_(*a, *args); ref.adam_(*b, *args)
    s = make(1031, dt, st, 1); r = clone(s)
    args = (0.1, None, 0.9, 0.1, 1e-3, True, False, False, None, None)
    torch.ops.fastcnn.sgd_(*s, *args); ref.sgd_(*r, *args)
    g = make(1031, dt, st, 1) + [[torch.tensor(0.0)]]; h = clone(g)
    args = (0.1, None, 0.01, 0.1, 1e-10, True, None, None)
    torch.ops.fastcnn.adagrad_(*g, *args); ref.adagrad_(*h, *args)
    for x, y in zip(s, r):
        assert torch.equal(x[0], y[0]), (dt, x[0], y[0])
    for x, y in zip(a + g, b + h):
        unit = torch.finfo(y[0].dtype).eps * max(1.0, y[0].abs().max().item())
        assert (x[0].double() - y[0].double()).abs().max().item() <= 4 * unit, (dt, x[0], y[0])
    l = make(1031, dt, st, 1); m = clone(l)
    args = (0.1, None, 0.9, 0.0, 1e-4, 1e-3, 1e-8, False, False, False, False, False, False, None, None)
    torch.ops.fastcnn.lars_(*l, *args); ref.lars_(*m, *args)
    torch.testing.assert_close(l[0][0], m[0][0], rtol=1e-5, atol=1e-6)
print("ok")
"""


def test_baseline_loops_equal_oracle():
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    out = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: clear errors naming the argument.
def _adam_call(**over):
    p = [torch.randn(5), torch.randn(3)]
    args = dict(params=p, grads=[torch.randn(5), torch.randn(3)], exp_avgs=[torch.zeros(5), torch.zeros(3)],
                exp_avg_sqs=[torch.zeros(5), torch.zeros(3)], max_exp_avg_sqs=[],
                steps=[torch.tensor(0.0), torch.tensor(0.0)], lr=1e-3, lr_tensor=None, beta1=0.9, beta2=0.999,
                weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False, decoupled_weight_decay=False,
                grad_scale=None, found_inf=None)
    args.update(over)
    torch.ops.fastcnn.adam_(*args.values())


@pytest.mark.parametrize("over, message", [
    (dict(grads=[torch.randn(5)]), "grads has 1 tensors but params has 2"),
    (dict(steps=[torch.tensor(0.0)]), "steps has 1 tensors"),
    (dict(amsgrad=True), "max_exp_avg_sqs has 0 tensors"),
    (dict(exp_avgs=[torch.zeros(5), torch.zeros(4)]), r"exp_avgs\[1\] must have the shape and strides"),
    (dict(grads=[torch.randn(5), torch.randn(3).double()]), r"grads\[1\] must have the dtype of params\[1\]"),
    (dict(exp_avg_sqs=[torch.zeros(5), torch.zeros(3, dtype=torch.bfloat16)]), r"exp_avg_sqs\[1\] must have the dtype"),
    (dict(params=[torch.randn(5), torch.arange(3)]), r"params\[1\] must be float16, bfloat16, float32 or float64"),
    (dict(params=[torch.randn(5), torch.randn(6)[::2]]), r"params\[1\] must be dense"),
    (dict(steps=[torch.tensor(0.0), torch.tensor([0.0])]), r"steps\[1\] must be a 0-dim float32 or float64"),
    (dict(steps=[torch.tensor(0.0), torch.tensor(0)]), r"steps\[1\] must be a 0-dim float32 or float64"),
    (dict(grad_scale=torch.tensor([2.0])), "grad_scale must be a 0-dim tensor"),
    (dict(found_inf=torch.tensor(0.0, dtype=torch.float64)), "found_inf must be float32"),
    (dict(lr_tensor=torch.ones(2)), "lr_tensor must be a 0-dim tensor"),
])
def test_adam_rejects_bad_inputs(over, message):
    with pytest.raises(RuntimeError, match=message):
        _adam_call(**over)


def test_state_dtype_rules():
    # float32 state beside bf16 params is fine; bf16 state beside float32 params is not.
    p = [torch.randn(4).bfloat16()]
    torch.ops.fastcnn.sgd_(p, [torch.randn(4).bfloat16()], [torch.zeros(4)], 0.1, None, 0.9, 0.0, 0.0, False, False,
                           True, None, None)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\] must have the dtype of params\[0\]"):
        torch.ops.fastcnn.sgd_([torch.randn(4)], [torch.randn(4)], [torch.zeros(4).bfloat16()], 0.1, None, 0.9, 0.0,
                               0.0, False, False, True, None, None)
    with pytest.raises(RuntimeError, match="momentum_buffers has 0 tensors"):
        torch.ops.fastcnn.lars_([torch.randn(4)], [torch.randn(4)], [], 0.1, None, 0.0, 0.0, 0.0, 1e-3, 0.0, False,
                                False, False, False, True, True, None, None)
    with pytest.raises(RuntimeError, match="state_sums has 1 tensors but params has 2"):
        torch.ops.fastcnn.adagrad_([torch.randn(4), torch.randn(2)], [torch.randn(4), torch.randn(2)],
                                   [torch.zeros(4)], [torch.tensor(0.0)] * 2, 0.1, None, 0.0, 0.0, 1e-10, False,
                                   None, None)


# ---------------------------------------------------------------------------------------------------------------
# CUDA only: one call over several dtype signatures (one launch each), and capture in a CUDA graph.
@pytest.mark.cuda
def test_cuda_mixed_dtypes_in_one_call():
    o = ADAM_OPTIONS[3]
    parts = [adam_lists([(7,), (70001,)], dt, st, "cuda") for dt, st in DTYPE_PAIRS]
    fused = Lists({k: [x for p in parts for x in p.t[k]] for k in parts[0].t})
    oracle = step_beside_oracle(fused, "adam_", lambda fn, lists, k: adam_step(fn, lists, o))
    compare(fused, oracle, exact=False)


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["adam_", "sgd_", "adagrad_", "lars_"])
def test_cuda_graph_capture(op):
    name, fused, step = next(c for c in all_ops("cuda") if c[0] == op)
    lr, found_inf = torch.tensor(0.01, device="cuda"), torch.zeros((), device="cuda")
    fused.new_grads()
    oracle = fused.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up step: builds the work table
        step(getattr(torch.ops.fastcnn, op), fused, lr_tensor=lr, found_inf=found_inf)
    torch.cuda.current_stream().wait_stream(side)
    step(getattr(reference, op), oracle, lr_tensor=lr, found_inf=found_inf)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(getattr(torch.ops.fastcnn, op), fused, lr_tensor=lr, found_inf=found_inf)
    for k in range(3):
        lr.fill_(0.01 * (k + 2))
        graph.replay()
        step(getattr(reference, op), oracle, lr_tensor=lr, found_inf=found_inf)
    torch.cuda.synchronize()
    compare(fused, oracle, exact=op == "sgd_")
    before = fused.clone()
    found_inf.fill_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    compare(fused, before, exact=True)
