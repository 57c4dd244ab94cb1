"""The Triton backend of the fused optimizer steps as torch.library.triton_op's (fastcnn::adam_triton_, ...), so
torch.compile sees into the kernels. Imported by fastcnn.ops.optim only when Triton is installed (a kernel module
that fails to import leaves the triton backend unavailable, saying why); the launchers in fastcnn.triton_kernels.optim
take the schema's arguments plus ``wrap``."""
import inspect
from typing import Optional

import torch
from torch.library import triton_op

from ...triton_kernels import optim as _kernels
from .._dispatch import wrap_triton
from .register import OPS, SCHEMAS, mutated_args

# Python annotations of the schema types the optimizer steps use, as torch.library.infer_schema reads them.
_ANNOTATIONS = {"List[Tensor]": list[torch.Tensor], "Optional[Tensor]": Optional[torch.Tensor], "float": float,
                "bool": bool}


def _signature(op):
    """The Python signature of ``op``'s schema. triton_op infers the op's schema from its function's signature
    (torch 2.11 ignores triton_op's ``schema`` argument), so the launcher wrapper, which takes ``*args``, carries
    the schema's named and annotated parameters instead."""
    schema = torch._C.parse_schema(f"fastcnn::{op}{SCHEMAS[op]}")
    parameters = [inspect.Parameter(arg.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation=_ANNOTATIONS[str(arg.type)]) for arg in schema.arguments]
    return inspect.Signature(parameters, return_annotation=None)


def _make(op):
    launch = getattr(_kernels, op)

    def step(*args):
        launch(*args, wrap=wrap_triton)

    step.__name__ = f"{op[:-1]}_triton_"
    step.__signature__ = _signature(op)
    # triton_op derives the fake kernel from `step` itself (wrap_triton does nothing under fake tensors).
    return triton_op(f"fastcnn::{op[:-1]}_triton_", step, mutates_args=mutated_args(op))


TRITON_OPS = {op: _make(op) for op in OPS}
