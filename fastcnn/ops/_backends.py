"""Which backend runs a fastcnn op: what is available on this machine, what the user forced, and the default order.

Backends: "cuda" (C++/CUDA kernels of fastcnn._C), "triton" (fastcnn.triton_kernels), "cpu" (C++ CPU kernels of
fastcnn._C) and "reference" (plain PyTorch, always available). `FASTCNN_BACKEND=<name>` or `set_backend(name)` forces
one; forcing a backend that cannot run an input is an error that says why, never a silent fallback.
"""
import contextlib
import importlib.util
import os

import torch

from .. import _extension

BACKENDS = ("cuda", "triton", "cpu", "reference")


def _triton_status():
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if not hasattr(torch.library, "triton_op"):
        return False, f"torch {torch.__version__} has no torch.library.triton_op"
    return True, None


_TRITON_OK, _TRITON_WHY_NOT = _triton_status()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_forced = os.environ.get("FASTCNN_BACKEND") or None


def why_unavailable(backend, device_type):
    """None when `backend` can run on `device_type` here, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return "the cpu backend runs on CPU tensors only"
        return None if _extension.LOADED else _extension.WHY_NOT_LOADED
    if backend == "cuda":
        if device_type != "cuda":
            return "the cuda backend runs on CUDA tensors only"
        if not _extension.LOADED:
            return _extension.WHY_NOT_LOADED
        return None if _extension.WITH_CUDA else "fastcnn._C was built without CUDA kernels"
    if backend == "triton":
        if not _TRITON_OK:
            return _TRITON_WHY_NOT
        if device_type == "cpu" and not TRITON_INTERPRET:
            return "Triton runs on CPU tensors only under its interpreter (TRITON_INTERPRET=1)"
        if device_type not in ("cpu", "cuda"):
            return f"Triton does not run on {device_type} tensors"
        return None
    raise ValueError(f"fastcnn: unknown backend {backend!r}; expected one of {BACKENDS}")


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``, or ``kernel`` itself when Triton's interpreter runs it: under
    TRITON_INTERPRET=1 ``triton.jit`` makes an InterpretedFunction, which torch 2.14's wrap_triton hands back as is
    and torch 2.11's rejects. Pass this as the launchers' ``wrap`` inside a triton_op."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    return torch.library.wrap_triton(kernel)


def set_backend(backend):
    """Forces `backend` for every fastcnn op (None restores automatic choice); returns the previous setting."""
    global _forced
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"fastcnn.set_backend: backend must be one of {BACKENDS} or None, got {backend!r}")
    previous, _forced = _forced, backend
    return previous


@contextlib.contextmanager
def use_backend(backend):
    """Context manager form of set_backend."""
    previous = set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)


def choose(device_type, preference):
    """The backend for one call: the forced one (checked), else the first available one in `preference`."""
    if _forced is not None:
        reason = why_unavailable(_forced, device_type)
        if reason is not None:
            raise RuntimeError(f"fastcnn: backend {_forced!r} was forced but cannot run here: {reason}")
        return _forced
    for backend in preference:
        if why_unavailable(backend, device_type) is None:
            return backend
    return "reference"
