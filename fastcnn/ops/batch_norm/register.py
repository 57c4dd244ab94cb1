"""The C++/CUDA BatchNorm ops of fastcnn._C (schemas in csrc/fastcnn.cpp) as a backend's primitive ops (`KERNELS`):
their fake kernels and the autograd of scale_shift_add_relu (the eval-mode epilogue, used directly by the blocks).
The training ops built on them are in batch_norm_train.py. Imported only when the extension has these ops."""
import torch

from ..reference.batch_norm import accumulation_dtype
from .batch_norm_autograd import Kernels, like_input, register_apply_autograd


def _channels(x):
    return x.new_empty(x.shape[1], dtype=accumulation_dtype(x.dtype))


@torch.library.register_fake("fastcnn::batch_norm_stats")
def _stats_fake(input):
    return _channels(input), _channels(input)


@torch.library.register_fake("fastcnn::scale_shift_add_relu")
def _apply_fake(input, scale, shift, residual, save_mask):
    mask = like_input(input, torch.uint8) if save_mask else input.new_empty(0, dtype=torch.uint8)
    return like_input(input), mask


@torch.library.register_fake("fastcnn::batch_norm_backward_reduce")
def _reduce_fake(grad_out, gate, input, mean):
    return _channels(input), _channels(input)


@torch.library.register_fake("fastcnn::batch_norm_backward_elemt")
def _elemt_fake(grad_out, gate, input, mean, a, b, d, want_dz):
    return like_input(input), like_input(input) if want_dz else input.new_empty(0)


KERNELS = Kernels(stats=torch.ops.fastcnn.batch_norm_stats, apply=torch.ops.fastcnn.scale_shift_add_relu,
                  backward_reduce=torch.ops.fastcnn.batch_norm_backward_reduce,
                  backward_elemt=torch.ops.fastcnn.batch_norm_backward_elemt)
register_apply_autograd("fastcnn::scale_shift_add_relu", KERNELS)

__all__ = ["KERNELS", "like_input"]
