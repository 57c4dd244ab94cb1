"""torch.library registration, Hypothesis-drawn arguments and bad input of the fused transposed convolution."""
import pytest
import torch
from _transpose_cases import assert_exactly_stock, integer_inputs

import fastcnn
from fastcnn import _extension

from _blocks import backends_here

needs_cpp = pytest.mark.skipif(not _extension.LOADED, reason="fastcnn._C is not built")
F = fastcnn.functional


@needs_cpp
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("args", [([2, 2], [0, 0], [0, 0], 1, [1, 1], "relu"),
                                  ([2, 2], [1, 1], [1, 1], 2, [1, 1], "relu"),
                                  ([2, 3], [1, 0], [0, 1], 1, [2, 1], "none")], ids=["k=s", "grouped", "general"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck_cpp_ops(device, args, channels_last):
    groups = args[3]
    x, w, b = (t.to(device) for t in integer_inputs(2, 2 * groups, 2 * groups, (5, 4), (2, 2), groups,
                                                    channels_last=channels_last))
    torch.library.opcheck(torch.ops.fastcnn.conv_transpose2d_act,
                          (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), *args))
    out = torch.ops.fastcnn.conv_transpose2d_act(x.detach(), w.detach(), b.detach(), *args)
    torch.library.opcheck(torch.ops.fastcnn.conv_transpose2d_act_backward,
                          (torch.randn_like(out), out, x.detach(), w.detach(), *args, [True, True, True]))


@pytest.mark.cuda
def test_opcheck_triton_op():
    x, w, b = (t.cuda().requires_grad_() for t in integer_inputs(2, 4, 4, (5, 4), (4, 4), 2))
    torch.library.opcheck(fastcnn.ops.conv_transpose.register_triton.conv_transpose2d_act_triton,
                          (x, w, b, [2, 2], [1, 1], [0, 0], 2, [1, 1], "relu"))


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if _extension.LOADED else []) + [
    pytest.param("cuda", marks=pytest.mark.cuda), pytest.param("triton", marks=pytest.mark.cuda)])
def test_module_under_torch_compile_fullgraph(backend):
    device = "cuda" if backend in ("cuda", "triton") else "cpu"
    layer = fastcnn.nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1, activation="relu").to(device)
    x = torch.randn(2, 4, 5, 6, device=device)
    torch._dynamo.reset()
    with fastcnn.use_backend(backend):
        out = torch.compile(layer, fullgraph=True)(x.requires_grad_())
        out.sum().backward()
        eager_x = x.detach().clone().requires_grad_()
        expected = layer(eager_x)
        expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, eager_x.grad)


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.given(data=st.data())
def test_random_arguments_match_stock_exactly(data):
    """Every stride/padding/output_padding/groups/dilation combination PyTorch accepts; odd sizes, both layouts."""
    draw = data.draw
    groups = draw(st.sampled_from([1, 2, 3]), "groups")
    kernel = draw(st.tuples(st.integers(1, 5), st.integers(1, 4)), "kernel")
    stride = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)), "stride")
    dilation = draw(st.tuples(st.integers(1, 2), st.integers(1, 2)), "dilation")
    padding = draw(st.tuples(st.integers(0, 2), st.integers(0, 2)), "padding")
    output_padding = tuple(draw(st.integers(0, max(stride[i], dilation[i]) - 1), f"output_padding{i}")
                           for i in (0, 1))
    size = draw(st.tuples(st.integers(1, 9), st.integers(1, 9)), "size")
    out_size = [(size[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + output_padding[i] + 1
                for i in (0, 1)]
    hypothesis.assume(min(out_size) >= 1)
    x, w, b = integer_inputs(draw(st.integers(1, 3), "batch"), groups * draw(st.integers(1, 3), "c_in/g"),
                             groups * draw(st.integers(1, 3), "c_out/g"), size, kernel, groups,
                             draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])),
                             draw(st.booleans(), "channels_last"), bias=draw(st.booleans(), "bias"))
    backend = draw(st.sampled_from([b for b in backends_here("cpu") if b != "triton"]), "backend")
    assert_exactly_stock(backend, x, w, b, (stride, padding, output_padding, groups, dilation,
                                            draw(st.sampled_from([None, "relu"]), "activation")))


def _inputs():
    return torch.randn(2, 4, 5, 5), torch.randn(4, 3, 2, 2), torch.randn(3)


@pytest.mark.parametrize("mutate,error,match", [
    (lambda x, w, b: (x[:, :3], w, b), ValueError, "input has 3 channels"),
    (lambda x, w, b: (x[0, 0], w, b), ValueError, "input must be 4-D"),
    (lambda x, w, b: (x, w[..., 0], b), ValueError, "weight must be 4-D"),
    (lambda x, w, b: (x, w, b[:2]), ValueError, r"bias must have shape \(3,\)"),
    (lambda x, w, b: (x, w, b.double()), TypeError, "bias has dtype torch.float64"),
    (lambda x, w, b: (x.long(), w, b), TypeError, "input must be float32"),
    (lambda x, w, b: (x, w, b.to("meta")), ValueError, "bias is on meta"),
])
@pytest.mark.parametrize("backend", backends_here("cpu"))
def test_bad_tensors(backend, mutate, error, match):
    x, w, b = mutate(*_inputs())
    with fastcnn.use_backend(backend), pytest.raises(error, match=match):
        F.conv_transpose2d(x, w, b, 2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(stride=2, output_padding=2), "output_padding .* must be smaller than stride"),
    (dict(stride=1, output_padding=1), "output_padding .* must be smaller than stride"),
    (dict(stride=0), "stride must be >= 1"),
    (dict(stride=2, padding=-1), "padding must be >= 0"),
    (dict(stride=2, dilation=(1, 2, 3)), "dilation must be an int or a pair"),
    (dict(stride=2, groups=3), "not divisible by groups=3"),
    (dict(stride=1, padding=4), "gives an empty output"),
    (dict(stride=2, activation="gelu"), "activation must be None, 'none' or 'relu'"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.conv_transpose2d(*_inputs(), **kwargs)
