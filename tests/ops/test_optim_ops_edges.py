"""Edge cases of the fused optimizer ops: the baseline (non-AVX2) CPU loops, bad inputs, and (on a GPU) several
dtype signatures in one call and CUDA-graph capture. The main equivalence tests are in test_optim_ops.py."""
import os
import subprocess
import sys

import pytest
import torch

from fastcnn import _extension
from fastcnn.ops.optim import reference

from _optim_op_cases import ADAM_OPTIONS, DTYPE_PAIRS, STEPS, Lists, adam_lists, adam_step, all_ops, compare

pytestmark = pytest.mark.skipif(not _extension.LOADED or not hasattr(torch.ops.fastcnn, "adam_"),
                                reason="fastcnn._C with the optimizer ops is not built")


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
    oracle = fused.clone()
    for _ in range(STEPS):
        fused.new_grads()
        oracle.copy_grads_from(fused)
        adam_step(torch.ops.fastcnn.adam_, fused, o)
        adam_step(reference.adam_, oracle, o)
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
