"""Fake kernels and autograd for the C++/CUDA transposed-convolution ops of fastcnn._C (schemas in
csrc/fastcnn.cpp). Imported only when the extension loaded."""
import torch

from ._conv_transpose_outputs import allocate_grads, allocate_output, register_transpose_autograd


@torch.library.register_fake("fastcnn::conv_transpose2d_act")
def _conv_transpose2d_act_fake(input, weight, bias, stride, padding, output_padding, groups, dilation, activation):
    return allocate_output(input, weight, stride, padding, output_padding, groups, dilation)


@torch.library.register_fake("fastcnn::conv_transpose2d_act_backward")
def _conv_transpose2d_act_backward_fake(grad_out, out, input, weight, stride, padding, output_padding, groups,
                                        dilation, activation, output_mask):
    return allocate_grads(input, weight, groups, output_mask)


register_transpose_autograd("fastcnn::conv_transpose2d_act", torch.ops.fastcnn.conv_transpose2d_act_backward)
