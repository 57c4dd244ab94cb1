"""The optimizer benchmark's own machinery on a tiny parameter set (benchmarks/bench_optim.py): every provider runs,
the in-run correctness check passes for fastcnn and catches a wrong result, ratios and byte counts are filled in,
and the parameter sets have the models' sizes."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import _optim_cases as C  # noqa: E402
import bench_optim as B  # noqa: E402

TINY = [(6, 3, 3, 3), (6,), (10, 6), (10,)]  # conv weight, bias, linear weight, bias: LARS excludes the 1-D ones
TIMING = dict(budget_s=0.0, min_reps=2, max_reps=2, warmup=1, retries=0)
CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", C.OPTIMIZERS)
def test_row_runs_checks_and_ratios(name, dtype):
    row = B.measure(name, "tiny", TINY, dtype, CPU, {"copy_gbps": 1.0}, TIMING)
    assert row["status"] == "ok", row
    fastcnn = [r for r in row["providers"].values() if r["role"] == "fastcnn"]
    assert fastcnn and all(r["ok"] and r["steps"] >= 3 for r in fastcnn)
    ratios = row["ratios"][B.best_fastcnn(row)]
    assert ratios and all(v > 0 for v in ratios.values())
    if name == "LARS":
        assert set(ratios) == {"unfused LARS"} and all(v > 0 for v in row["lars_over_sgd"].values())
    else:
        assert set(ratios) == set(C.TORCH_VARIANTS)
    assert all(r["state_dtype"] == "float32" for r in fastcnn)  # fastcnn keeps fp32 state beside bf16 params
    torch_state = {r["state_dtype"] for r in row["providers"].values() if r["role"] == "baseline"}
    assert torch_state == {str(dtype).replace("torch.", "")}


def _stepped(name, dtype, steps=3):
    """A fastcnn run and its check partner, from the same start, after ``steps`` steps."""
    init, grads = B.make_tensors(TINY, dtype, CPU)
    factories = {n: f for n, _, _, f in C.providers(name, CPU, dtype)[0]}
    ours, partner = (B.start(factories[n], init, grads) for n in ("fastcnn[cpu]", C.check_partner(name)))
    for _ in range(steps):
        ours()
        partner()
    return ours, partner, init, grads


@pytest.mark.parametrize("name", ["Adam", "LARS"])
def test_check_catches_a_wrong_result(name):
    ours, partner, init, grads = _stepped(name, torch.float32)
    assert B.lockstep_check(ours, partner)["ok"] or name == "LARS"
    assert B.oracle_check(name, ours, partner, init, grads)["ok"]
    with torch.no_grad():
        ours.params[2].view(-1)[5] += 1e-3  # one element off by far more than rounding
    assert not B.lockstep_check(ours, partner)["ok"]
    assert not B.oracle_check(name, ours, partner, init, grads)["ok"]


def test_parameter_sets_and_bytes():
    resnet = C.param_shapes("resnet50")  # raises unless the total is 25,557,032
    assert len(resnet) == 161 and sum(C.excluded_from_lars(s) for s in resnet) == 107
    numel = sum(math.prod(s) for s in TINY)
    assert C.step_bytes("Adam", TINY, torch.float32, torch.float32, "fastcnn") == 28 * numel
    assert C.step_bytes("SGD", TINY, torch.bfloat16, torch.float32, "fastcnn") == (3 * 2 + 2 * 4) * numel
    adapted = 6 * 27 + 60
    assert C.step_bytes("LARS", TINY, torch.float32, torch.float32, "fastcnn") == 20 * numel + 8 * adapted
    quick = C.param_shapes("resnet50", C.QUICK_SCALE)
    assert len(quick) == 161 and sum(math.prod(s) for s in quick) < 4e6
