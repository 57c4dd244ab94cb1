"""The fused optimizer steps (fastcnn::adam_, sgd_, adagrad_, lars_): their route tables and the public steps.

Backends, in the order tried (`ROUTES`, one table per step): on CUDA tensors "cuda" (multi-tensor C++/CUDA kernels
of fastcnn._C), then "triton"; on CPU tensors "cpu" (C++ kernels of fastcnn._C); "reference" (plain PyTorch,
fastcnn.ops.optim.reference) everywhere. A C++ backend counts as available only when fastcnn._C has a kernel for that
op and dispatch key; a forced backend (fastcnn.set_backend) that cannot run a call raises, saying why. Every backend
is a torch.library op (schemas, fakes and the reference ops in register.py, the Triton ops in register_triton.py).
"""
import torch

from .._dispatch import CPU_RESULTS, Route, RouteTable, load_triton, route
from . import reference  # noqa: F401  (the oracle, fastcnn.ops.optim.reference)
from .register import OPS, REFERENCE_OPS, SCHEMAS, mutated_args

_triton, _TRITON_WHY_NOT = load_triton(".register_triton", __name__)
TRITON_OPS = None if _triton is None else _triton.TRITON_OPS

ROUTES = {op: RouteTable(op, [
    Route("cuda", device="cuda"),
    Route("triton", device="cuda"),
    # CPU, fp32 ResNet-50 / VGG-16 parameter sets: 0.97-1.00x torch's fused step (memory-bound: the same passes),
    # 2.0-6.0x its foreach and single-tensor steps (the reference backend's speed class); LARS 2.0-2.9x the unfused
    # LARS.
    Route("cpu", measured=f"{CPU_RESULTS}_optim_float32.json#resnet50,vgg16", device="cpu"),
], compiled=(op,), triton=_TRITON_WHY_NOT, no_float64=("triton",)) for op in OPS}


def why_unavailable(op, backend, device_type, dtype=None):
    """None when ``backend`` can run fastcnn::``op`` on ``device_type`` tensors (of ``dtype``) here, else why not."""
    if op not in OPS:
        raise ValueError(f"fastcnn: unknown optimizer op {op!r}; expected one of {OPS}")
    return ROUTES[op].why_not(backend, device_type, dtype)


def implementation(op, backend):
    """The callable (a torch.library op) of fastcnn::``op`` on ``backend``."""
    if backend == "reference":
        return REFERENCE_OPS[op]
    if backend == "triton":
        return TRITON_OPS[op]
    return getattr(torch.ops.fastcnn, op)


def _run(op, params, args):
    if not params:
        return
    backend = route(ROUTES[op], params[0])
    implementation(op, backend)(params, *args)


def adam_(params, *args):
    """fastcnn::adam_ (Adam / AdamW, optional AMSGrad) on the backend chosen for ``params``; arguments as the
    schema in ``SCHEMAS``, semantics in fastcnn.ops.optim.reference.adam_."""
    _run("adam_", params, args)


def sgd_(params, *args):
    """fastcnn::sgd_ (SGD with momentum, dampening, Nesterov, weight decay); see fastcnn.ops.optim.reference.sgd_."""
    _run("sgd_", params, args)


def adagrad_(params, *args):
    """fastcnn::adagrad_ (Adagrad with lr decay and weight decay); see fastcnn.ops.optim.reference.adagrad_."""
    _run("adagrad_", params, args)


def lars_(params, *args):
    """fastcnn::lars_ (LARS / LARC trust ratio + SGD momentum); see fastcnn.ops.optim.reference.lars_."""
    _run("lars_", params, args)


__all__ = ["OPS", "REFERENCE_OPS", "ROUTES", "SCHEMAS", "TRITON_OPS", "adagrad_", "adam_", "implementation",
           "lars_", "mutated_args", "sgd_", "why_unavailable"]
