"""The Triton backend of the fused optimizer steps as torch.library.triton_op's (fastcnn::adam_triton_, ...), so
torch.compile sees into the kernels. Imported by fastcnn.ops.optim only when Triton is installed and
fastcnn.triton_kernels.optim exists; the launchers there take the schema's arguments plus ``wrap``."""
from torch.library import triton_op, wrap_triton

from ..triton_kernels import optim as _kernels
from .optim import OPS, SCHEMAS, mutated_args


def _make(op):
    launch = getattr(_kernels, op)

    def step(*args):
        launch(*args, wrap=wrap_triton)

    step.__name__ = f"{op[:-1]}_triton_"
    # triton_op derives the fake kernel from `step` itself (wrap_triton does nothing under fake tensors).
    return triton_op(f"fastcnn::{op[:-1]}_triton_", step, mutates_args=mutated_args(op), schema=SCHEMAS[op])


TRITON_OPS = {op: _make(op) for op in OPS}
