"""torch.library registration of the fused block: opcheck (schema, fake kernels, autograd registration,
aot_dispatch) and torch.compile(fullgraph=True). On a GPU-less machine this covers the C++ CPU ops; the Triton ops
are checked this way on the GPU (the interpreter touches fake tensors' data, so it cannot run under fake mode)."""
import pytest
import torch

import fastcnn
from fastcnn import _extension

from _blocks import POOL_CASES, integer_inputs

needs_cpp = pytest.mark.skipif(not _extension.LOADED, reason="fastcnn._C is not built")
POOLS = POOL_CASES + [("max", (3, 3), (2, 2))]


def _devices():
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@needs_cpp
@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("pool,pool_size,pool_stride", POOLS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck_cpp_ops(device, pool, pool_size, pool_stride, channels_last):
    x, w, b = (t.to(device) for t in integer_inputs(2, 4, 6, (9, 8), (3, 3), groups=2,
                                                            channels_last=channels_last))
    args = ([1, 1], [1, 1], [1, 1], 2, pool, list(pool_size), list(pool_stride))
    torch.library.opcheck(torch.ops.fastcnn.conv2d_relu_pool,
                          (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), *args))
    out, code = torch.ops.fastcnn.conv2d_relu_pool(x.detach(), w.detach(), b.detach(), *args)
    grad = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastcnn.conv2d_relu_pool_backward,
                          (grad, out, code, x.detach(), w.detach(), *args, [True, True, True]))
    conv = torch.nn.functional.conv2d(x.detach(), w.detach(), None, 1, 1, 1, 2)
    torch.library.opcheck(torch.ops.fastcnn.bias_relu_pool,
                          (conv.requires_grad_(), b.detach().requires_grad_(), pool, list(pool_size),
                           list(pool_stride)))
    torch.library.opcheck(torch.ops.fastcnn.bias_relu_pool_backward,
                          (grad, out, code, list(conv.shape[2:]), pool, list(pool_size), list(pool_stride), True))


@pytest.mark.cuda
@pytest.mark.parametrize("pool,pool_size,pool_stride", POOLS)
def test_opcheck_triton_op(pool, pool_size, pool_stride):
    x, w, b = (t.cuda().requires_grad_() for t in integer_inputs(2, 4, 6, (9, 8), (3, 3), groups=2))
    op = fastcnn.ops.conv_relu_pool.register_triton.conv2d_relu_pool_triton
    torch.library.opcheck(op, (x, w, b, [1, 1], [1, 1], [1, 1], 2, pool, list(pool_size), list(pool_stride)))


def _compile_backends():
    backends = []
    if _extension.LOADED:
        backends += ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
    return backends + ["reference", pytest.param("triton", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("backend", _compile_backends())
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_module_under_torch_compile_fullgraph(backend, channels_last):
    device = "cuda" if backend in ("cuda", "triton") else "cpu"
    block = fastcnn.nn.ConvReLUPool2d(3, 8, 3, padding=1).to(device)
    x = torch.randn(2, 3, 12, 10, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with fastcnn.use_backend(backend):
        compiled = torch.compile(block, fullgraph=True)
        out = compiled(x.requires_grad_())
        out.sum().backward()
        eager_x = x.detach().clone().requires_grad_()
        expected = block(eager_x)
        expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, eager_x.grad)
