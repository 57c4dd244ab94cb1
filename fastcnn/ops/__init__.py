"""The torch.library layer: one package per op (its public function and route table in ``__init__.py``, custom ops'
fakes and autograd in ``register.py``, Triton ops in ``register_triton.py``, the plain-PyTorch oracle in
``reference.py``), and the one router, ``_dispatch.py``, that decides which backend runs each call.

Every op package is imported here (so its ops are registered and its route table is in ``TABLES``); a new op needs
no edit in this file.
"""
import importlib
import pkgutil

from ._args import pair
from ._dispatch import (
    BACKENDS,
    MODULE_TABLES,
    TABLES,
    accumulation_dtype,
    skip_stock_routes,
    memory_format_of,
    set_backend,
    use_backend,
    why_unavailable,
)

OP_PACKAGES = tuple(module.name for module in pkgutil.iter_modules(__path__) if module.ispkg)
for _name in OP_PACKAGES:
    globals()[_name] = importlib.import_module(f".{_name}", __name__)

__all__ = ["BACKENDS", "MODULE_TABLES", "OP_PACKAGES", "TABLES", "accumulation_dtype", "skip_stock_routes",
           "memory_format_of", "pair", "set_backend", "use_backend", "why_unavailable", *OP_PACKAGES]
