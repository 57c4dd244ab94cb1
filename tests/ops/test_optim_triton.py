"""The fused-optimizer Triton launchers (fastcnn.triton_kernels.optim) against the plain-PyTorch oracle.

The launchers are called directly, on CPU tensors under Triton's interpreter (tests/conftest.py turns it on for
GPU-less machines) or on CUDA tensors where a GPU is present. Every case runs a few steps on tensors of odd sizes in
lockstep with fastcnn.ops.optim.reference and compares params, gradients (written back when unscaled) and every state
tensor with the project's table (tests/_tolerances.py):
  * assert_close_to_oracle: the error against a float64 run of the reference is at most twice the same-precision
    reference's error plus the dtype's floor;
  * assert_lockstep: against the same-precision reference, OPTIM_LOCKSTEP_ULPS units of eps * max(1, max|ref|).
Under the interpreter (numpy: no FMA contraction) the kernels replicate the reference's order of operations, so two
exactness checks are added there (compiled kernels may contract a*b + c into an FMA): every element within 2 ulps of
itself or of the tensor's magnitude (4 for LARS), and at most one bf16 element different at all. Not bitwise,
because torch's vectorised CPU sqrt is not correctly rounded (about 16% of fp32 results are 1 ulp off; the kernels'
sqrt is IEEE, as CUDA's), and LARS sums its squares in another order than torch's norm (measured: under 1 ulp).
"""
import os
import zlib

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from fastcnn.ops.optim import reference as ref  # noqa: E402
from fastcnn.triton_kernels import optim as tk  # noqa: E402
from fastcnn.triton_kernels.optim import _common as kernels_common  # noqa: E402
from tests._tolerances import assert_close_to_oracle, assert_lockstep  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = (1, 7, 33, 1025)
STEPS = 3
BF16 = torch.bfloat16
F32 = torch.float32

# State lists per optimizer: (name, kind), kind in "param" (param dtype), "state" (state dtype), "step".
LISTS = {
    "adam": [("params", "param"), ("grads", "param"), ("exp_avgs", "state"), ("exp_avg_sqs", "state"),
             ("max_exp_avg_sqs", "state"), ("steps", "step")],
    "sgd": [("params", "param"), ("grads", "param"), ("momentum_buffers", "state")],
    "adagrad": [("params", "param"), ("grads", "param"), ("state_sums", "state"), ("steps", "step")],
    "lars": [("params", "param"), ("grads", "param"), ("momentum_buffers", "state")],
}
DEFAULTS = {
    "adam": dict(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
                 decoupled_weight_decay=False),
    "sgd": dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    "adagrad": dict(lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False),
    "lars": dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4, trust_coefficient=1e-3, eps=1e-8,
                 nesterov=False, maximize=False, trust_clip=False, update_norm=False, lr_in_momentum=False),
}
# Extra options: lr_tensor / grad_scale / found_inf are values of those 0-dim tensors; first=True runs the
# is_first_step sequence (True, False, False) from empty buffers; zero_grad zeroes the 7-element tensor's grads
# (LARS's ratio-of-1 branch); pdtypes gives each tensor its own param dtype (two dtype signatures in one call).
CASES = {
    "adam": {
        "plain": {},
        "l2": dict(weight_decay=0.1),
        "adamw": dict(weight_decay=0.1, decoupled_weight_decay=True),
        "amsgrad_maximize": dict(amsgrad=True, maximize=True, weight_decay=0.05),
        "lr_tensor_scale": dict(lr_tensor=3e-3, grad_scale=1024.0, found_inf=0.0, amsgrad=True),
        "bf16_fp32_state": dict(dtype=BF16, state_dtype=F32, weight_decay=0.1, decoupled_weight_decay=True),
        "bf16_all": dict(dtype=BF16, amsgrad=True, grad_scale=8.0),
        "fp64": dict(dtype=torch.float64, weight_decay=0.1),
        "mixed_dtypes": dict(pdtypes=(F32, BF16, F32, BF16), state_dtype=F32, weight_decay=0.1),
    },
    "sgd": {
        "momentum": {},
        "first_nesterov_wd": dict(first=True, nesterov=True, weight_decay=1e-2),
        "dampening_maximize": dict(dampening=0.1, maximize=True, weight_decay=1e-2),
        "no_momentum": dict(momentum=0.0, weight_decay=1e-2),
        "lr_tensor_scale": dict(lr_tensor=0.05, grad_scale=64.0, found_inf=0.0, first=True),
        "bf16_fp32_state": dict(dtype=BF16, state_dtype=F32, nesterov=True, weight_decay=1e-2),
        "bf16_all": dict(dtype=BF16, dampening=0.1, grad_scale=4.0),
    },
    "adagrad": {
        "plain": {},
        "decay_wd": dict(lr_decay=0.01, weight_decay=0.1),
        "maximize_lr_tensor_scale": dict(maximize=True, lr_tensor=0.05, grad_scale=16.0, found_inf=0.0),
        "bf16_fp32_state": dict(dtype=BF16, state_dtype=F32, weight_decay=0.1, lr_decay=0.01),
        "bf16_all": dict(dtype=BF16),
    },
    "lars": {
        "plain": dict(zero_grad=True),
        "first_nesterov": dict(first=True, nesterov=True, dampening=0.1),
        "update_norm_maximize": dict(update_norm=True, maximize=True, weight_decay=1e-2),
        "trust_clip": dict(trust_clip=True, trust_coefficient=1.0, zero_grad=True),
        "lr_in_momentum": dict(lr_in_momentum=True, first=True),
        "lr_in_momentum_nesterov": dict(lr_in_momentum=True, nesterov=True, momentum=0.8),
        "no_momentum": dict(momentum=0.0),
        "lr_tensor_scale": dict(lr_tensor=0.2, grad_scale=256.0, found_inf=0.0, trust_clip=True),
        "bf16_fp32_state": dict(dtype=BF16, state_dtype=F32, update_norm=True),
        "bf16_all": dict(dtype=BF16, lr_in_momentum=True, grad_scale=2.0),
    },
}
SPECIAL = ("dtype", "state_dtype", "pdtypes", "first", "zero_grad", "lr_tensor", "grad_scale", "found_inf")


def _uses(opt, name, hp):
    if name == "max_exp_avg_sqs":
        return hp["amsgrad"]
    if name == "momentum_buffers":
        return hp["momentum"] != 0 or hp.get("lr_in_momentum", False)
    return True


def _init(opt, name, n, gen):
    if name in ("params", "grads"):
        return torch.randn(n, generator=gen)
    if name in ("exp_avg_sqs", "max_exp_avg_sqs", "state_sums"):
        return torch.rand(n, generator=gen) * 0.01
    return torch.randn(n, generator=gen) * 0.1  # exp_avgs, momentum_buffers


def _make(opt, spec, gen):
    """Initial tensors: {list name: [tensor per size]} in the case's dtypes."""
    hp = {**DEFAULTS[opt], **{k: v for k, v in spec.items() if k not in SPECIAL}}
    dtype = spec.get("dtype", F32)
    pdtypes = spec.get("pdtypes", (dtype,) * len(SIZES))
    sdtype = spec.get("state_dtype", dtype)
    lists = {}
    for name, kind in LISTS[opt]:
        if not _uses(opt, name, hp):
            lists[name] = []
        elif kind == "step":
            lists[name] = [torch.full((), 2.0, device=DEVICE) for _ in SIZES]
        else:
            lists[name] = [_init(opt, name, n, gen).to(DEVICE, pdtypes[i] if kind == "param" else sdtype)
                           for i, n in enumerate(SIZES)]
    if spec.get("first"):  # the buffers are never read on the first step
        lists["momentum_buffers"] = [torch.full_like(b, float("nan")) for b in lists["momentum_buffers"]]
    return hp, lists


def _clone(lists, dtype=None):
    return {k: [t.clone() if dtype is None or k == "steps" else t.to(dtype) for t in v] for k, v in lists.items()}


def _call(fn, opt, lists, hp, extra, first, **kw):
    args = [lists[name] for name, _ in LISTS[opt] if name != "steps" or opt != "adam"]
    h = dict(hp)
    lr = h.pop("lr")
    if opt == "adam":
        fn(*args[:5], lists["steps"], lr, extra["lr_tensor"], *h.values(), extra["grad_scale"], extra["found_inf"],
           **kw)
    elif opt == "adagrad":
        fn(*args, lr, extra["lr_tensor"], *h.values(), extra["grad_scale"], extra["found_inf"], **kw)
    else:  # sgd, lars
        fn(*args, lr, extra["lr_tensor"], *h.values(), first, extra["grad_scale"], extra["found_inf"], **kw)


def _extras(spec):
    def t(key):
        return None if key not in spec else torch.full((), spec[key], dtype=F32, device=DEVICE)
    return dict(lr_tensor=t("lr_tensor"), grad_scale=t("grad_scale"), found_inf=t("found_inf"))


def _new_grads(lists, spec, gen):
    scale = spec.get("grad_scale", 1.0)
    for g in lists["grads"]:
        new = torch.randn(g.shape, generator=gen) * scale
        if spec.get("zero_grad") and g.numel() == 7:
            new.zero_()
        g.copy_(new)


def _assert_ulps(result, expected, name, ulps):
    """|result - expected| <= ulps * eps(dtype) * (|expected| + max |expected|): a few ulps of the element or, where
    an update cancelled most of it (a param near 0), of the tensor's magnitude."""
    eps = torch.finfo(result.dtype).eps
    scale = expected.double().abs().nan_to_num().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(result, expected, rtol=ulps * eps, atol=ulps * eps * scale, equal_nan=True,
                               msg=lambda m: f"{name}: {m}")
    if result.element_size() < 4:
        # bf16 results are rounded from the same fp32 values as the reference's, except where a 1-ulp fp32 sqrt
        # difference meets a bf16 rounding boundary (about 2^-16 per element): at most one may differ.
        differ = ((result != expected) & ~(result.isnan() & expected.isnan())).sum().item()
        assert differ <= 1, f"{name}: {differ} of {result.numel()} elements differ from the reference"


def _run_case(opt, case, spec, monkeypatch=None, per_tensor=False):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{opt}/{case}".encode()))
    hp, init = _make(opt, spec, gen)
    got, stock, oracle = _clone(init), _clone(init), _clone(init, torch.float64)
    extra = _extras(spec)
    if per_tensor:
        monkeypatch.setattr(kernels_common, "MULTI_TENSOR", False)
    fn_k = getattr(tk, opt + "_")
    fn_r = getattr(ref, opt + "_")
    for step in range(STEPS):
        _new_grads(got, spec, gen)
        for other in (stock, oracle):
            for g, src in zip(other["grads"], got["grads"]):
                g.copy_(src)
        first = bool(spec.get("first")) and step == 0
        _call(fn_k, opt, got, hp, extra, first)
        _call(fn_r, opt, stock, hp, extra, first)
        _call(fn_r, opt, oracle, hp, extra, first)
    ulps = 4 if opt == "lars" else 2  # see the module docstring
    for name, tensors in got.items():
        for i, (r, s, o) in enumerate(zip(tensors, stock[name], oracle[name])):
            label = f"{opt}/{case}: {name}[{i}] ({r.dtype}, {r.numel()})"
            assert_close_to_oracle(r, s, o.double(), label)
            assert_lockstep(r, s, label)
            if INTERPRET:
                _assert_ulps(r, s, label, ulps)


@pytest.mark.parametrize("opt,case", [(o, c) for o in CASES for c in CASES[o]])
def test_matches_reference(opt, case):
    _run_case(opt, case, CASES[opt][case])


@pytest.mark.parametrize("opt,case", [("adam", "lr_tensor_scale"), ("sgd", "first_nesterov_wd"),
                                      ("adagrad", "decay_wd"), ("lars", "lr_tensor_scale"),
                                      ("lars", "bf16_all")])
def test_per_tensor_launches_match_reference(opt, case, monkeypatch):
    # The path torch.compile / opcheck take (tensors without addresses): one launch per tensor, direct pointers.
    _run_case(opt, case, CASES[opt][case], monkeypatch, per_tensor=True)


@pytest.mark.parametrize("opt", list(CASES))
@pytest.mark.parametrize("per_tensor", [False, True])
def test_found_inf_changes_nothing(opt, per_tensor, monkeypatch):
    if per_tensor:
        monkeypatch.setattr(kernels_common, "MULTI_TENSOR", False)
    spec = dict(grad_scale=128.0, found_inf=1.0, lr_tensor=0.1)
    if opt == "adam":
        spec["amsgrad"] = True
    hp, lists = _make(opt, spec, torch.Generator().manual_seed(1))
    before = _clone(lists)
    _call(getattr(tk, opt + "_"), opt, lists, hp, _extras(spec), False)
    for name, tensors in lists.items():
        for t, b in zip(tensors, before[name]):
            assert torch.equal(t, b), f"{opt}: {name} changed although found_inf was set"


@pytest.mark.parametrize("opt,launches", [("adam", 2), ("sgd", 1), ("adagrad", 2), ("lars", 2)])
def test_launch_count(opt, launches):
    # The whole multi-tensor step is one update launch (plus the step increment, or LARS's partial sums).
    if INTERPRET and DEVICE != "cpu":
        pytest.skip("the interpreter copies CUDA arguments to the host, so it runs the per-tensor launches")
    seen = []

    def wrap(kernel):
        seen.append(kernel)
        return kernel

    hp, lists = _make(opt, {}, torch.Generator().manual_seed(2))
    extra = _extras({})
    _call(getattr(tk, opt + "_"), opt, lists, hp, extra, False, wrap=wrap)
    assert len(seen) == launches, [k.fn.__name__ for k in seen]
    seen.clear()
    _call(getattr(tk, opt + "_"), opt, lists, hp, extra, False, wrap=wrap)  # the cached table is reused
    assert len(seen) == launches


def test_dense_non_contiguous_layout_and_empty_list():
    # channels_last params with like-strided grads and buffers are updated as flat memory.
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(2, 3, 5, 7, generator=gen).to(DEVICE).to(memory_format=torch.channels_last)
    g = torch.randn(2, 3, 5, 7, generator=gen).to(DEVICE).to(memory_format=torch.channels_last)
    b = torch.randn(2, 3, 5, 7, generator=gen).to(DEVICE).to(memory_format=torch.channels_last)
    lists = [[p], [g], [b]]
    expected = [[t.clone() for t in x] for x in lists]
    tk.sgd_(*lists, 0.1, None, 0.9, 0.0, 1e-2, True, False, False, None, None)
    ref.sgd_(*expected, 0.1, None, 0.9, 0.0, 1e-2, True, False, False, None, None)
    for r, e in zip(lists, expected):
        assert_close_to_oracle(r[0], e[0], e[0].double(), "sgd/channels_last")
    tk.sgd_([], [], [], 0.1, None, 0.9, 0.0, 0.0, False, False, False, None, None)


def test_rejects_mismatched_lists():
    p = [torch.randn(5, device=DEVICE)]
    with pytest.raises(ValueError):
        tk.sgd_(p, [torch.randn(6, device=DEVICE)], [torch.randn(5, device=DEVICE)], 0.1, None, 0.9, 0.0, 0.0,
                False, False, False, None, None)
    with pytest.raises(ValueError):
        tk.adam_(p, [torch.randn(5, device=DEVICE)], [torch.zeros(5, device=DEVICE)],
                 [torch.zeros(5, device=DEVICE)], [], [torch.zeros((), device=DEVICE)], 1e-3, None, 0.9, 0.999,
                 0.0, 1e-8, True, False, False, None, None)


def test_lars_chunk_grows_for_huge_tensors():
    # No LARS tensor has more than LARS_MAX_PARTS partial sums for each update program to re-reduce.
    cfg = dict(BLOCK=1024, CHUNK=16384)
    small = torch.empty(1).expand(5000)
    assert kernels_common.chunk_size(cfg, [[small]], kernels_common.LARS_MAX_PARTS) == 16384
    huge = torch.empty(1).expand(102_760_448)  # VGG-16 fc6, without the memory
    chunk = kernels_common.chunk_size(cfg, [[huge]], kernels_common.LARS_MAX_PARTS)
    assert chunk % 1024 == 0 and -(-huge.numel() // chunk) <= kernels_common.LARS_MAX_PARTS
