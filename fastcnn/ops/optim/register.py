"""The fused optimizer steps' registrations: their schemas (repeated from csrc/fastcnn.cpp for the Python-side ops;
a test checks that the two agree), the fakes of fastcnn._C's steps, and the reference as opaque custom ops.

Every step mutates its tensor lists in place and returns nothing, so every fake does nothing; with a fake on every
backend, ``torch.compile(fullgraph=True)`` traces an optimizer step without graph breaks.
"""
import re

import torch

from ... import _extension
from . import reference

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


if _extension.LOADED:
    for _op in OPS:
        if hasattr(torch.ops.fastcnn, _op):
            torch.library.register_fake(f"fastcnn::{_op}", _nothing)

# The reference as opaque custom ops: it reads scalars on the host, which torch.compile must not trace.
REFERENCE_OPS = {
    op: torch.library.custom_op(f"fastcnn::{op[:-1]}_reference_", getattr(reference, op),
                                mutates_args=mutated_args(op), schema=SCHEMAS[op])
    for op in OPS
}
for _custom in REFERENCE_OPS.values():
    _custom.register_fake(_nothing)
