"""Transitional: the ops not yet moved to their package route through here; fastcnn/ops/_dispatch.py is the router."""
from . import _dispatch
from ._dispatch import BACKENDS, set_backend, use_backend, why_unavailable, wrap_triton  # noqa: F401


def choose(device_type, preference):
    """The backend for one call: the forced one (checked), else the first available one in `preference`."""
    forced = _dispatch.forced_backend()
    if forced is not None:
        reason = why_unavailable(forced, device_type)
        if reason is not None:
            raise RuntimeError(f"fastcnn: backend {forced!r} was forced but cannot run here: {reason}")
        return forced
    for backend in preference:
        if why_unavailable(backend, device_type) is None:
            return backend
    return "reference"
