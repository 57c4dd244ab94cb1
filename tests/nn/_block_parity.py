"""The parity check of a fused block against its stock twin holding the same state_dict: forward, backward and
buffers, each against a float64 copy of the stock block by the 2x-stock-error rule of tests/_tolerances.py."""
import copy

import torch

import fastcnn
from fastcnn.ops import memory_format_of

from _tolerances import assert_close_to_oracle


def run(module, x, grad_out):
    """(output, input gradient, {parameter name: gradient}) of one forward + backward of module on a copy of x."""
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad_out.to(out.dtype))
    grads = {name: p.grad for name, p in module.named_parameters()}
    return out.detach(), x.grad, grads


def assert_block_matches_stock(block, stock, x, grad_out, backend, train):
    """Runs block (under backend) and stock, both cast to x's dtype and put in train/eval mode, and a float64 copy of
    stock; compares the outputs (in x's memory format), the buffers (running statistics) and the gradients."""
    oracle = copy.deepcopy(stock).double().train(train)
    block, stock = block.to(x.dtype).train(train), stock.to(x.dtype).train(train)
    with fastcnn.use_backend(backend):
        out, grad_x, grads = run(block, x, grad_out)
    expected = run(stock, x, grad_out)
    exact = run(oracle, x.double(), grad_out.double())
    assert out.is_contiguous(memory_format=memory_format_of(x))
    assert_close_to_oracle(out, expected[0], exact[0], "out")
    for name, buffer in block.named_buffers():
        if buffer.is_floating_point():
            assert_close_to_oracle(buffer, stock.get_buffer(name), oracle.get_buffer(name), name)
        else:
            assert torch.equal(buffer, stock.get_buffer(name)), name
    if train and x.dtype == torch.bfloat16:
        # Through the inner ReLUs, an element whose pre-activation lies within bf16 rounding of 0 may take either
        # side in fastcnn and in stock (each rounds differently), which moves a gradient by a whole |grad_out|: a
        # max-error comparison of block gradients is then a coin toss. The bf16 gradients of each fused training
        # op are compared against stock in tests/ops/test_batch_norm.py instead.
        return
    assert_close_to_oracle(grad_x, expected[1], exact[1], "grad_x")
    for name, grad in grads.items():
        assert_close_to_oracle(grad, expected[2][name], exact[2][name], name)
