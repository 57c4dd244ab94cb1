"""Training-mode BatchNorm fused with what follows it in a residual block, as custom ops built on the C++/CUDA
kernels of fastcnn._C (autograd and fakes in batch_norm_autograd.py, math in fastcnn/reference/batch_norm.py):

* ``fastcnn::batch_norm_add_relu(y, weight, bias, residual, eps)`` -> (out, mask, mean, var);
* ``fastcnn::batch_norm_relu_conv2d(y, weight, bias, conv_weight, stride, padding, dilation, groups, eps)`` ->
  (out, mean, var);
* ``fastcnn::batch_norm_relu_conv2d_stats(...)`` -> (out, mean, var, out_mean, out_var);
* ``fastcnn::batch_norm_relu_backward(grad_out, gate, y, weight, mean, var, eps, want_dz)`` -> (grad_y,
  grad_weight, grad_bias, dz): the backward both share, usable by other fused ops ending in BatchNorm + ReLU.

Imported only when the extension has the BatchNorm ops.
"""
from .batch_norm_autograd import composite_conv_stats, define_training_ops
from .batch_norm_cpp import KERNELS

CONV_STATS = composite_conv_stats(KERNELS)  # (ATen's convolution: its epilogue cannot take the reduction)
TRAINING = define_training_ops("", KERNELS, CONV_STATS)
batch_norm_add_relu = TRAINING.batch_norm_add_relu
batch_norm_relu_conv2d = TRAINING.batch_norm_relu_conv2d
batch_norm_relu_backward = TRAINING.batch_norm_relu_backward

__all__ = ["CONV_STATS", "KERNELS", "TRAINING", "batch_norm_add_relu", "batch_norm_relu_backward",
           "batch_norm_relu_conv2d"]
