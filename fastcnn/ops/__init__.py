"""The torch.library layer: one package per op (its public function and route table in ``__init__.py``, custom ops'
fakes and autograd in ``register.py``, Triton ops in ``register_triton.py``, the plain-PyTorch oracle in
``reference.py``), and the one router, ``_dispatch.py``, that decides which backend runs each call."""
from . import conv_relu_pool, conv_transpose, optim
from ._args import pair
from ._dispatch import BACKENDS, TABLES, accumulation_dtype, memory_format_of, set_backend, use_backend, why_unavailable

__all__ = ["BACKENDS", "TABLES", "accumulation_dtype", "conv_relu_pool", "conv_transpose", "memory_format_of", "optim", "pair", "set_backend",
           "use_backend", "why_unavailable"]
