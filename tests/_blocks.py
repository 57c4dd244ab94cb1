"""Shared helpers of the fused-block tests: backends to test here, input makers, and the stock computation."""
import pytest
import torch

import fastcnn
from fastcnn.ops import why_unavailable
from fastcnn.ops.conv_relu_pool.reference import conv2d_relu_pool as stock  # noqa: F401  (the stock Conv2d -> ReLU -> pool)

LECTURE_CASES = [(1, 3, 0), (1, 3, 1), (1, 3, 2), (1, 4, 2), (2, 3, 1)]  # (stride, kernel, padding)
POOL_CASES = [("max", (2, 2), (2, 2)), ("avg", (2, 2), (2, 2)), ("none", (1, 1), (1, 1))]


def backends_here(device_type="cpu"):
    """The backends that can run on `device_type` on this machine (Triton on CPU only under its interpreter)."""
    return [b for b in fastcnn.BACKENDS if why_unavailable(b, device_type) is None]


def device_backends():
    """(device, backend) pairs to test: what runs on CPU here, plus the GPU backends (marked, skipped without one)."""
    cases = [pytest.param("cpu", b, id=f"cpu-{b}") for b in backends_here("cpu")]
    return cases + [pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.cuda) for b in ("cuda", "triton")]


def integer_inputs(n, c_in, c_out, size, kernel, groups=1, dtype=torch.float32, channels_last=False, bias=True,
                   device="cpu"):
    """Small-integer tensors: every sum the block computes is exact in every dtype, so fused and stock must agree
    bit for bit, ties in the pool included (which tests the first-maximum-wins rule)."""
    x = torch.randint(-1, 3, (n, c_in, *size)).to(device, dtype)
    w = torch.randint(-1, 2, (c_out, c_in // groups, *kernel)).to(device, dtype)
    b = torch.randint(-1, 2, (c_out,)).to(device, dtype) if bias else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w, b


def forward_backward(fn, tensors, grad_out=None):
    """Runs fn on leaf copies of `tensors` (None passes through) and backpropagates grad_out (default: integers).
    Returns (output, grad_out, [grad of each tensor])."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    if grad_out is None:
        grad_out = torch.randint(-2, 3, out.shape).to(out.device, out.dtype)
    out.backward(grad_out)
    return out.detach(), grad_out, [None if t is None else t.grad for t in leaves]


def assert_compiles_like_eager(module, x, backend):
    """torch.compile(module, fullgraph=True) under `backend`: its output and input gradient equal eager's."""
    torch._dynamo.reset()
    with fastcnn.use_backend(backend):
        out = torch.compile(module, fullgraph=True)(x.requires_grad_())
        out.sum().backward()
        eager_x = x.detach().clone().requires_grad_()
        expected = module(eager_x)
        expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, eager_x.grad)


def saved_bytes(fn, *args):
    """Bytes autograd keeps for backward while running fn(*args), counting each storage once."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())
