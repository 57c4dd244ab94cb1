"""The torch.library layer: custom ops, fake kernels, autograd, and the routing of each call to a backend."""
from . import conv_relu_pool
from ._backends import BACKENDS, set_backend, use_backend, why_unavailable

__all__ = ["BACKENDS", "conv_relu_pool", "set_backend", "use_backend", "why_unavailable"]
