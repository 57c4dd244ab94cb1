"""The Triton backend of the fused block as torch.library.triton_op's, so torch.compile sees into the kernels.
Imported only when Triton is installed; the kernels live in fastcnn.triton_kernels.conv_relu_pool."""
from typing import List, Optional, Tuple

import torch
from torch.library import triton_op

from ...triton_kernels.conv_relu_pool import conv2d_relu_pool_backward as _launch_backward
from ...triton_kernels.conv_relu_pool import conv2d_relu_pool_forward as _launch_forward
from .._dispatch import wrap_triton
from .register import allocate_conv_outputs, allocate_grads, register_conv_autograd


@triton_op("fastcnn::conv2d_relu_pool_triton", mutates_args={})
def conv2d_relu_pool_triton(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            stride: List[int], padding: List[int], dilation: List[int], groups: int, pool: str,
                            pool_size: List[int], pool_stride: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    out, code = allocate_conv_outputs(input, weight, stride, padding, dilation, pool, pool_size, pool_stride)
    _launch_forward(input, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups, pool,
                    tuple(pool_size), tuple(pool_stride), out, code, wrap=wrap_triton)
    return out, code


@triton_op("fastcnn::conv2d_relu_pool_triton_backward", mutates_args={})
def conv2d_relu_pool_triton_backward(grad_out: torch.Tensor, out: torch.Tensor, code: torch.Tensor,
                                     input: torch.Tensor, weight: torch.Tensor, stride: List[int],
                                     padding: List[int], dilation: List[int], groups: int, pool: str,
                                     pool_size: List[int], pool_stride: List[int],
                                     output_mask: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients rebuilt from the pooled gradient and the code; the ones output_mask leaves out come back empty."""
    grad_input, grad_weight, grad_bias = allocate_grads(input, weight, output_mask)
    _launch_backward(grad_out, out, code, input, weight, tuple(stride), tuple(padding), tuple(dilation), groups,
                     pool, tuple(pool_size), tuple(pool_stride), grad_input if output_mask[0] else None,
                     grad_weight if output_mask[1] else None, grad_bias if output_mask[2] else None,
                     wrap=wrap_triton)
    return grad_input, grad_weight, grad_bias


run_conv2d_relu_pool_triton = register_conv_autograd("conv2d_relu_pool_triton", conv2d_relu_pool_triton,
                                                     conv2d_relu_pool_triton_backward)
