"""Shared helpers of the fused BatchNorm op tests: inputs, and a value + gradient comparison against stock PyTorch
(or another backend) with a float64 oracle."""
import torch

from _tolerances import assert_close_to_oracle


def bn_inputs(dtype, channels_last, shape=(3, 7, 5, 13)):
    """(y, weight, bias): y with mean 0.5 and std 2 in `dtype` and layout; weight and bias float64."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype).contiguous(memory_format=fmt)
    params = torch.randn(2, shape[1], dtype=torch.float64)
    return y, params[0] + 1.5, params[1]


def output_and_grads(fn, tensors, grad_out):
    """[fn(*tensors), grad of each tensor] for leaf copies of `tensors`, backpropagating grad_out."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def compare_with_stock(fused, stock, tensors, dtype, out_shape):
    """fused and stock on `tensors` in dtype (BatchNorm parameters in float32, as nn.BatchNorm2d keeps them under
    autocast), against stock in float64: the output and every gradient."""
    low = [t.to(dtype) if t.dim() == 4 else t.float() for t in tensors]
    grad_out = torch.randn(out_shape, dtype=torch.float64)
    result, expected, exact = (output_and_grads(fused, low, grad_out), output_and_grads(stock, low, grad_out),
                               output_and_grads(stock, [t.double() for t in tensors], grad_out))
    for name, r, e, o in zip(["out", "grad_y", "grad_weight", "grad_bias", "grad_4"], result, expected, exact):
        assert_close_to_oracle(r.to(e.dtype), e, o, name)
