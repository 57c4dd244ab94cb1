"""Triton kernels and their launch helpers, installed as ``fastcnn.triton_kernels``.

Importing this package never raises and imports nothing heavy: ``HAS_TRITON`` says whether Triton is importable.
The kernel modules, one per op package of ``fastcnn.ops`` and named after it (``conv_relu_pool``, ``conv_transpose``,
``batch_norm``, the ``optim`` package; ``_conv_common`` and ``_rounding`` are their shared helpers), import Triton at
their top; ``fastcnn.ops`` imports them only when it routes a call to the ``triton`` backend.
"""
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install that fails while importing
    HAS_TRITON = False

__all__ = ["HAS_TRITON"]
