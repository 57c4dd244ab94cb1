"""The fused optimizer steps (fastcnn::adam_, sgd_, adagrad_, lars_): fake kernels, the reference and Triton ops, and
the routing of each call to a backend.

Every step mutates its tensor lists in place and returns nothing; the schemas live in csrc/fastcnn.cpp and are
repeated in ``SCHEMAS`` below for the reference and Triton ops (a test checks that the two agree). Backends, in the
order tried: on CUDA tensors "cuda" (multi-tensor C++/CUDA kernels of fastcnn._C), then "triton"; on CPU tensors
"cpu" (C++ kernels of fastcnn._C); "reference" (plain PyTorch, fastcnn.reference.optim) everywhere. A C++ backend
counts as available only when fastcnn._C has a kernel for that op and dispatch key; a forced backend
(fastcnn.set_backend) that cannot run a call raises, saying why. Every backend is a torch.library op with a fake
kernel, so ``torch.compile(fullgraph=True)`` traces an optimizer step without graph breaks.
"""
import importlib
import importlib.util
import re

import torch

from .. import _extension
from ..reference import optim as reference
from . import _backends

OPS = ("adam_", "sgd_", "adagrad_", "lars_")

SCHEMAS = {
    "adam_": "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
             "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] steps, float lr, Tensor? lr_tensor, float beta1, "
             "float beta2, float weight_decay, float eps, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
             "Tensor? grad_scale, Tensor? found_inf) -> ()",
    "sgd_": "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, float lr, Tensor? lr_tensor, "
            "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, bool is_first_step, "
            "Tensor? grad_scale, Tensor? found_inf) -> ()",
    "adagrad_": "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums, Tensor(d!)[] steps, float lr, "
                "Tensor? lr_tensor, float lr_decay, float weight_decay, float eps, bool maximize, "
                "Tensor? grad_scale, Tensor? found_inf) -> ()",
    "lars_": "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, float lr, Tensor? lr_tensor, "
             "float momentum, float dampening, float weight_decay, float trust_coefficient, float eps, "
             "bool nesterov, bool maximize, bool trust_clip, bool update_norm, bool lr_in_momentum, "
             "bool is_first_step, Tensor? grad_scale, Tensor? found_inf) -> ()",
}


def mutated_args(op):
    """Names of the arguments that ``op`` mutates, read from its schema."""
    return tuple(re.findall(r"Tensor\(\w!\)\[\] (\w+)", SCHEMAS[op]))


def _nothing(*args):
    return None


# --- the C++ ops of fastcnn._C: fakes, and which dispatch keys have a kernel -----------------------------------
def _has_kernel(op, key):
    if not _extension.LOADED:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastcnn::{op}", key)
    except RuntimeError:  # the schema is missing (an older fastcnn._C)
        return False


_CPP_KERNELS = {(op, key): _has_kernel(op, key) for op in OPS for key in ("CPU", "CUDA")}
if _extension.LOADED:
    for _op in OPS:
        if hasattr(torch.ops.fastcnn, _op):
            torch.library.register_fake(f"fastcnn::{_op}", _nothing)

# --- the reference as opaque custom ops (it reads scalars on the host, which torch.compile must not trace) ------
REFERENCE_OPS = {
    op: torch.library.custom_op(f"fastcnn::{op[:-1]}_reference_", getattr(reference, op),
                                mutates_args=mutated_args(op), schema=SCHEMAS[op])
    for op in OPS
}
for _custom in REFERENCE_OPS.values():
    _custom.register_fake(_nothing)


# --- the Triton ops (fastcnn.triton_kernels.optim, when it exists and Triton is installed) ----------------------
def _load_triton():
    reason = _backends.why_unavailable("triton", "cuda")
    if reason is not None:
        return None, reason
    try:
        if importlib.util.find_spec("fastcnn.triton_kernels.optim") is None:
            return None, "fastcnn.triton_kernels.optim (the Triton optimizer kernels) is not there yet"
        return importlib.import_module(".optim_triton", __package__).TRITON_OPS, None
    except Exception as error:  # a broken kernel module must not break `import fastcnn`
        return None, f"the Triton optimizer kernels failed to load: {type(error).__name__}: {error}"


TRITON_OPS, _TRITON_WHY_NOT = _load_triton()


# --- routing ------------------------------------------------------------------------------------------------------
_PREFERENCE = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


def why_unavailable(op, backend, device_type, dtype=None):
    """None when ``backend`` can run fastcnn::``op`` on ``device_type`` tensors (of ``dtype``) here, else why not."""
    if op not in OPS:
        raise ValueError(f"fastcnn: unknown optimizer op {op!r}; expected one of {OPS}")
    reason = _backends.why_unavailable(backend, device_type)
    if reason is not None:
        return reason
    if backend in ("cpu", "cuda") and not _CPP_KERNELS[(op, backend.upper())]:
        return f"fastcnn._C has no {backend.upper()} kernel for fastcnn::{op}"
    if backend == "triton":
        if TRITON_OPS is None:
            return _TRITON_WHY_NOT
        if dtype == torch.float64:
            return "the triton backend does not support float64"
    return None


def backend_for(op, device_type, dtype=None):
    """The backend that runs fastcnn::``op`` on these tensors: the forced one (checked), else the first available."""
    preference = tuple(b for b in _PREFERENCE.get(device_type, ())
                       if why_unavailable(op, b, device_type, dtype) is None)
    backend = _backends.choose(device_type, preference)
    reason = why_unavailable(op, backend, device_type, dtype)
    if reason is not None:
        raise RuntimeError(f"fastcnn: backend {backend!r} was forced but cannot run fastcnn::{op} here: {reason}")
    return backend


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
    backend = backend_for(op, params[0].device.type, params[0].dtype)
    implementation(op, backend)(params, *args)


def adam_(params, *args):
    """fastcnn::adam_ (Adam / AdamW, optional AMSGrad) on the backend chosen for ``params``; arguments as the
    schema in ``SCHEMAS``, semantics in fastcnn.reference.optim.adam_."""
    _run("adam_", params, args)


def sgd_(params, *args):
    """fastcnn::sgd_ (SGD with momentum, dampening, Nesterov, weight decay); see fastcnn.reference.optim.sgd_."""
    _run("sgd_", params, args)


def adagrad_(params, *args):
    """fastcnn::adagrad_ (Adagrad with lr decay and weight decay); see fastcnn.reference.optim.adagrad_."""
    _run("adagrad_", params, args)


def lars_(params, *args):
    """fastcnn::lars_ (LARS / LARC trust ratio + SGD momentum); see fastcnn.reference.optim.lars_."""
    _run("lars_", params, args)
