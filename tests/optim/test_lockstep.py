"""fastcnn.optim.Adam/AdamW/SGD/Adagrad in lockstep with torch.optim.X(fused=True) for 100 steps, comparing every
param and state tensor at every step, for every option combination torch supports, on every backend available here
(Triton under the interpreter: 5 steps on tiny tensors). CUDA variants run on a GPU machine only."""
import itertools

import pytest
import torch
from _lockstep import OP_OF, SHAPES, backend_params, backends, run_lockstep, steps_for

ADAM_CASES = [dict(amsgrad=a, maximize=m, weight_decay=wd, decoupled_weight_decay=d)
              for a, m, wd, d in itertools.product([False, True], [False, True], [0.0, 0.1], [False, True])
              if not (d and wd == 0.0)]
SGD_CASES = [dict(momentum=mom, dampening=damp, nesterov=nest, weight_decay=wd, maximize=m)
             for mom, damp, nest, wd, m in itertools.product([0.0, 0.9], [0.0, 0.3], [False, True], [0.0, 0.05],
                                                             [False, True])
             if not (nest and (mom == 0 or damp != 0)) and not (mom == 0 and damp != 0)]
ADAGRAD_CASES = [dict(lr_decay=ld, weight_decay=wd, initial_accumulator_value=iav, maximize=m)
                 for ld, wd, iav, m in itertools.product([0.0, 0.01], [0.0, 0.1], [0.0, 0.2], [False, True])]


def _id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


def _exact_order(case):
    """torch's CPU fused AdamW multiplies the param by (1 - lr*wd) rounded to the param dtype; fastcnn (like torch's
    CUDA kernel) subtracts lr*wd*p in float32: they drift apart by ~0.2 ulp a step, so that case is checked against
    the float64 oracle only."""
    return not (case.get("decoupled_weight_decay") and case.get("weight_decay", 0) != 0)


@pytest.mark.parametrize("backend", backend_params("adam_"))
@pytest.mark.parametrize("case", ADAM_CASES, ids=_id)
def test_adam_lockstep(backend, case):
    steps, shapes = steps_for(backend)
    run_lockstep("Adam", dict(lr=1e-2, **case), backend, steps, shapes, exact_order=_exact_order(case))


@pytest.mark.parametrize("backend", backend_params("adam_"))
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adamw_lockstep(backend, amsgrad):
    steps, shapes = steps_for(backend)
    run_lockstep("AdamW", dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, amsgrad=amsgrad), backend, steps, shapes,
                 exact_order=False)
    run_lockstep("AdamW", dict(lr=1e-2, weight_decay=0.0, amsgrad=amsgrad), backend, steps, shapes)


@pytest.mark.parametrize("backend", backend_params("sgd_"))
@pytest.mark.parametrize("case", SGD_CASES, ids=_id)
def test_sgd_lockstep(backend, case):
    steps, shapes = steps_for(backend)
    run_lockstep("SGD", dict(lr=0.05, **case), backend, steps, shapes)


@pytest.mark.parametrize("backend", backend_params("adagrad_"))
@pytest.mark.parametrize("case", ADAGRAD_CASES, ids=_id)
def test_adagrad_lockstep(backend, case):
    steps, shapes = steps_for(backend)
    run_lockstep("Adagrad", dict(lr=0.1, **case), backend, steps, shapes)


@pytest.mark.parametrize("backend", backend_params("adam_"))
@pytest.mark.parametrize("name,kwargs", [
    ("Adam", dict(lr=torch.tensor(1e-2), amsgrad=True)),
    ("AdamW", dict(lr=torch.tensor(1e-2), weight_decay=0.0)),
    ("SGD", dict(lr=torch.tensor(0.05), momentum=0.9, nesterov=True)),
    ("Adagrad", dict(lr=torch.tensor(0.1), lr_decay=0.01)),
], ids=["adam", "adamw", "sgd", "adagrad"])
def test_tensor_lr_lockstep(backend, name, kwargs):
    steps, shapes = steps_for(backend)
    run_lockstep(name, kwargs, backend, steps, shapes)


@pytest.mark.parametrize("backend,dtype", [
    pytest.param(b.values[0], dtype, id=f"{b.id}-{dtype}")
    for b in backend_params("adam_") for dtype in (torch.bfloat16, torch.float16, torch.float64)
    if not (b.values[0] == "triton" and dtype == torch.float64)  # the triton backend has no float64 kernels
])
@pytest.mark.parametrize("name,kwargs", [
    ("Adam", dict(lr=1e-2, weight_decay=0.1)),
    ("SGD", dict(lr=0.05, momentum=0.9)),
    ("Adagrad", dict(lr=0.1)),
], ids=["adam", "sgd", "adagrad"])
def test_other_dtypes_against_oracle(backend, dtype, name, kwargs):
    """Low precision (state in the param dtype, as torch): as close to the float64 oracle as torch's fused step is
    (flash-attention's rule); float64: lockstep."""
    steps, shapes = steps_for(backend, 30)
    run_lockstep(name, kwargs, backend, steps, shapes, dtype=dtype, exact_order=dtype == torch.float64)


@pytest.mark.parametrize("backend", backend_params("adam_"))
def test_bf16_params_fp32_state(backend):
    """state_dtype=float32 beside bfloat16 params: fp32 moments, and at least as close to the oracle as torch."""
    steps, shapes = steps_for(backend, 30)
    ours, _, p_ours, _ = run_lockstep("AdamW", dict(lr=1e-2), backend, steps, shapes, dtype=torch.bfloat16,
                                      exact_order=False, ours_kwargs=dict(state_dtype=torch.float32))
    state = ours.state[p_ours[0]]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
    assert p_ours[0].dtype == torch.bfloat16


@pytest.mark.cuda
@pytest.mark.parametrize("name,kwargs", [
    ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(lr=torch.tensor(1e-2), maximize=True)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.1)),
], ids=["adam", "adamw", "sgd", "adagrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_lockstep(name, kwargs, dtype):
    """On the GPU, torch's fused kernels use the same op order as fastcnn's (AdamW's decay included), on every
    backend that can run CUDA tensors; a tensor of 1031 elements spans several blocks."""
    for backend in backends(OP_OF[name], "cuda"):
        run_lockstep(name, kwargs, backend, 100, SHAPES + [(1031,)], dtype=dtype, device="cuda",
                     exact_order=dtype == torch.float32)
