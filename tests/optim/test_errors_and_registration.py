"""Bad input gives torch.optim's errors (or clear fastcnn ones); the op schemas, fakes and routing."""
import re

import pytest
import torch

import fastcnn
from fastcnn import _extension
from fastcnn.ops import why_unavailable
from fastcnn.ops import optim as optim_ops

CLASSES = ["Adam", "AdamW", "SGD", "Adagrad"]


@pytest.mark.parametrize("name", CLASSES)
def test_argument_checks_are_torchs(name):
    params = [torch.randn(3, requires_grad=True)]
    for kwargs in (dict(lr=-1.0), dict(lr=torch.tensor([1e-3, 1e-3]))):
        with pytest.raises(ValueError) as ours:
            getattr(fastcnn.optim, name)(params, **kwargs)
        with pytest.raises(ValueError) as stock:
            getattr(torch.optim, name)(params, **kwargs)
        assert str(ours.value) == str(stock.value)
    torch_opt = getattr(torch.optim, name)(params)
    ours_opt = getattr(fastcnn.optim, name)(params)
    assert ours_opt.defaults == torch_opt.defaults
    assert isinstance(ours_opt, getattr(torch.optim, name))


@pytest.mark.parametrize("kwargs,match", [(dict(betas=(1.0, 0.9)), "beta parameter at index 0"),
                                          (dict(eps=-1.0), "epsilon"), (dict(weight_decay=-0.1), "weight_decay")])
def test_adam_ranges(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastcnn.optim.Adam([torch.randn(3, requires_grad=True)], **kwargs)


def test_sgd_nesterov_needs_momentum():
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero dampening"):
        fastcnn.optim.SGD([torch.randn(3, requires_grad=True)], lr=0.1, nesterov=True)


@pytest.mark.parametrize("name", CLASSES + ["LARS"])
def test_bad_params(name):
    kwargs = dict(lr=0.1)
    with pytest.raises(RuntimeError, match="complex"):
        getattr(fastcnn.optim, name)([torch.randn(3, dtype=torch.complex64, requires_grad=True)], **kwargs)
    with pytest.raises(RuntimeError, match="floating-point"):
        getattr(fastcnn.optim, name)([torch.zeros(3, dtype=torch.int64)], **kwargs)
    with pytest.raises(RuntimeError, match="one device"):
        getattr(fastcnn.optim, name)([torch.randn(3, requires_grad=True),
                                      torch.randn(3, device="meta", requires_grad=True)], **kwargs)
    p = torch.randn(4, 3, requires_grad=True)
    opt = getattr(fastcnn.optim, name)([p], **kwargs)
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize("name", CLASSES)
def test_differentiable_is_refused(name):
    with pytest.raises(RuntimeError, match="not differentiable"):
        getattr(fastcnn.optim, name)([torch.randn(3, requires_grad=True)], lr=0.1, differentiable=True)


def test_foreach_fused_capturable_accepted_as_torch():
    p = [torch.randn(3, requires_grad=True)]
    fastcnn.optim.Adam(p, foreach=True)
    fastcnn.optim.Adam(p, fused=True, capturable=True)
    with pytest.raises(RuntimeError, match="cannot be `True` together"):
        fastcnn.optim.Adam(p, fused=True, foreach=True)


@pytest.mark.parametrize("kwargs,match", [(dict(lr=-1.0), "learning rate"), (dict(lr=1.0, trust_norm="grad"),
                                                                             "trust_norm"),
                                          (dict(lr=1.0, nesterov=True, momentum=0.0), "Nesterov"),
                                          (dict(lr=1.0, lr_in_momentum=True, dampening=0.1), "dampening"),
                                          (dict(lr=1.0, exclude=3), "callable")])
def test_lars_argument_checks(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fastcnn.optim.LARS([torch.randn(3, requires_grad=True)], **kwargs)


def test_forced_backend_that_cannot_run_raises():
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.randn(3)
    opt = fastcnn.optim.SGD([p], lr=0.1)
    with fastcnn.use_backend("cuda"), pytest.raises(RuntimeError, match="was forced but cannot run"):
        opt.step()


@pytest.mark.skipif(not _extension.LOADED, reason="fastcnn._C is not built")
def test_python_schemas_match_the_cpp_ones():
    for op in optim_ops.OPS:
        if hasattr(torch.ops.fastcnn, op):
            schema = str(getattr(torch.ops.fastcnn, op).default._schema)
            assert schema == f"fastcnn::{op}{optim_ops.SCHEMAS[op]}"



@pytest.mark.skipif(why_unavailable("triton", "cuda") is not None, reason="Triton is not installed")
def test_triton_ops_load_with_the_cpp_schemas():
    """An installed Triton backend must load: a failure there would otherwise only show as triton cases missing from
    the parametrized tests (torch 2.11's triton_op, for one, infers the schema from the function's signature)."""
    assert optim_ops.TRITON_OPS is not None, optim_ops._TRITON_WHY_NOT
    for op, triton_op in optim_ops.TRITON_OPS.items():
        alias_free = re.sub(r"\(\w+!\)", "(!)", str(triton_op._opoverload._schema))
        assert alias_free == re.sub(r"\(\w+!\)", "(!)", f"fastcnn::{op[:-1]}_triton_{optim_ops.SCHEMAS[op]}")

def _adam_args(dtype=torch.float32):
    t = [torch.randn(s, dtype=dtype) for s in ((7,), (3, 5))]
    return ([x.clone() for x in t], [torch.randn_like(x) for x in t], [torch.zeros_like(x) for x in t],
            [torch.zeros_like(x) for x in t], [], [torch.zeros(()) for _ in t], 1e-2, None, 0.9, 0.999, 0.0, 1e-8,
            False, False, False, torch.tensor(2.0), torch.tensor(0.0))


def test_opcheck_reference_ops():
    torch.library.opcheck(optim_ops.REFERENCE_OPS["adam_"], _adam_args())
    t = [torch.randn(7), torch.randn(3, 5)]
    torch.library.opcheck(optim_ops.REFERENCE_OPS["sgd_"], ([x.clone() for x in t], [torch.randn_like(x) for x in t],
                                                          [torch.zeros_like(x) for x in t], 0.1, torch.tensor(0.1),
                                                          0.9, 0.0, 0.01, True, False, True, None, None))
    torch.library.opcheck(optim_ops.REFERENCE_OPS["lars_"], ([x.clone() for x in t], [torch.randn_like(x) for x in t],
                                                           [torch.zeros_like(x) for x in t], 0.1, None, 0.9, 0.0,
                                                           0.01, 0.001, 1e-8, False, False, True, False, False, True,
                                                           None, None))
    torch.library.opcheck(optim_ops.REFERENCE_OPS["adagrad_"], ([x.clone() for x in t],
                                                              [torch.randn_like(x) for x in t],
                                                              [torch.zeros_like(x) for x in t],
                                                              [torch.zeros(()) for _ in t], 0.1, None, 0.01, 0.0,
                                                              1e-10, False, None, None))


@pytest.mark.parametrize("backend", [b for b in ("cpu", "cuda") if optim_ops.why_unavailable("adam_", b, "cpu")
                                     is None])
def test_opcheck_cpp_ops(backend):
    torch.library.opcheck(torch.ops.fastcnn.adam_, _adam_args())


def test_found_inf_skips_everything_in_the_op():
    args = list(_adam_args())
    args[-1] = torch.tensor(1.0)
    before = [[x.clone() for x in lst] for lst in args[:6]]
    for backend in [b for b in fastcnn.BACKENDS if optim_ops.why_unavailable("adam_", b, "cpu") is None]:
        optim_ops.implementation("adam_", backend)(*args)
        for lst, old in zip(args[:6], before):
            assert all(torch.equal(a, b) for a, b in zip(lst, old))


def test_info_lists_the_optimizer_ops():
    from fastcnn import info
    assert "adam_" in info.OPS and "lars_" in info.report()
