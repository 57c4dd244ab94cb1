"""fastcnn: fused CUDA/C++/Triton kernels for convolutional networks, as drop-in PyTorch modules.

Importing never fails for want of a compiled backend: a missing or mismatched fastcnn._C warns once and the
Triton/reference backends serve; `python -m fastcnn.info` says what is available here and why.
"""
from . import (
    _extension,  # noqa: F401  (loads fastcnn._C, which defines the op schemas)
    functional,
    models,
    nn,
    ops,
    optim,
)
from .convert import convert
from .ops import BACKENDS, set_backend, use_backend

__version__ = "0.1.0"
__all__ = ["BACKENDS", "convert", "functional", "models", "nn", "ops", "optim", "set_backend", "use_backend",
           "__version__"]
