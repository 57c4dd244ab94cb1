"""The fused ConvTranspose2d + bias + activation on every backend available here, against stock PyTorch; the C++
stride-phase split forced; torch.library registration (opcheck, torch.compile), Hypothesis-drawn arguments and bad
input. The Triton backward against a float64 oracle: test_conv_transpose_triton.py."""
import pytest
import torch
from _conv_transpose_cases import CASES, assert_exactly_stock, case_args, case_id, fused, integer_inputs, stock

import fastcnn
from fastcnn import _extension
from fastcnn.ops.conv_transpose.reference import conv_transpose2d_by_phases

from _blocks import assert_compiles_like_eager, backends_here, forward_backward
from _hypothesis import assume, given, st
from _tolerances import assert_close_to_oracle

BACKENDS = backends_here("cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
needs_cpp = pytest.mark.skipif(not _extension.LOADED, reason="fastcnn._C is not built")


def _dtypes(backend):
    # The Triton interpreter is slow and its bf16 tl.dot is broken (ENVIRONMENT.md): float32 here; its float16
    # forward and backward are checked on random values (below and in test_conv_transpose_triton.py).
    return [torch.float32] if backend == "triton" else DTYPES + [torch.float64]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_stock_exactly(backend, case, channels_last):
    kernel, stride, padding, output_padding, dilation, groups = case
    args = ((stride, stride), (padding, padding), (output_padding, output_padding), groups, (dilation, dilation))
    for dtype in _dtypes(backend):
        for activation in ("relu", None):
            x, w, b = integer_inputs(2, 2 * groups, 3 * groups, (5, 7), (kernel, kernel), groups, dtype,
                                     channels_last)
            assert_exactly_stock(backend, x, w, b, args + (activation,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rectangular_kernels_and_no_bias(backend):
    x, w, _ = integer_inputs(1, 3, 4, (6, 5), (4, 2))
    assert_exactly_stock(backend, x, w, None, ((2, 2), (1, 0), (1, 0), 1, (1, 1), "relu"))
    x, w, _ = integer_inputs(2, 3, 2, (3, 4), (2, 3))
    assert_exactly_stock(backend, x, w, None, ((2, 3), (0, 1), (0, 2), 1, (1, 1), None))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (4, 2, 1)])
def test_random_values_within_twice_stock_error(backend, dtype, kernel, stride, padding):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bf16 tl.dot is broken; checked on the GPU")
    x, w, b = torch.randn(2, 6, 7, 5), torch.randn(6, 5, kernel, kernel) / 3, torch.randn(5)
    args = ((stride,) * 2, (padding,) * 2, (0, 0), 1, (1, 1), "relu")
    oracle, grad_out, oracle_grads = forward_backward(lambda *t: stock(*t, *args), (x.double(), w.double(),
                                                                                     b.double()))
    low = [t.to(dtype) for t in (x, w, b)]
    stock_out, _, stock_grads = forward_backward(lambda *t: stock(*t, *args), low, grad_out.to(dtype))
    with fastcnn.use_backend(backend):
        out, _, grads = forward_backward(lambda *t: fused(*t, *args), low, grad_out.to(dtype))
    assert_close_to_oracle(out, stock_out, oracle, "out")
    for name, got, ref, oracle_grad in zip(("input", "weight", "bias"), grads, stock_grads, oracle_grads):
        assert_close_to_oracle(got, ref, oracle_grad, f"grad {name}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # float64: not Triton
@pytest.mark.parametrize("case", CASES[:4], ids=case_id)
def test_gradcheck_float64(backend, case):
    kernel, stride, padding, output_padding, dilation, groups = case
    x = torch.randn(1, 2 * groups, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2 * groups, 2, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2 * groups, dtype=torch.float64, requires_grad=True)
    with fastcnn.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *t: fused(*t, stride, padding, output_padding, groups, dilation, "relu"), (x, w, b))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_phase_decomposition_equals_stock(case):
    """The documented phase formulation (the kernels' math) reproduces F.conv_transpose2d exactly."""
    kernel, stride, padding, output_padding, dilation, groups = case
    x, w, b = integer_inputs(2, 2 * groups, 3 * groups, (5, 4), (kernel, kernel), groups)
    args = ((stride,) * 2, (padding,) * 2, (output_padding,) * 2, groups, (dilation,) * 2, "relu")
    torch.testing.assert_close(conv_transpose2d_by_phases(x, w, b, *args), stock(x, w, b, *args), atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_and_gradients_only_where_needed(backend):
    x, w, b = integer_inputs(1, 2, 3, (4, 4), (2, 2))
    x[0, 1, 2, 2] = float("nan")
    args = ((2, 2), (0, 0), (0, 0), 1, (1, 1), "relu")
    with fastcnn.use_backend(backend):
        out, grad_out, grads = forward_backward(lambda *t: fused(*t, *args), (x, w, b))
    expected, _, expected_grads = forward_backward(lambda *t: stock(*t, *args), (x, w, b), grad_out)
    torch.testing.assert_close(out, expected, equal_nan=True, atol=0, rtol=0)
    for got, ref in zip(grads, expected_grads):
        torch.testing.assert_close(got, ref, equal_nan=True, atol=0, rtol=0)
    x, w, b = integer_inputs(1, 2, 3, (4, 4), (2, 2))
    w.requires_grad_()
    with fastcnn.use_backend(backend):
        fused(x, w, b, *args).sum().backward()
        assert x.grad is None and b.grad is None and w.grad is not None
        with torch.no_grad():
            assert not fused(x, w, b, *args).requires_grad


def test_unbatched_and_empty_batch():
    x, w, b = integer_inputs(1, 3, 4, (5, 5), (2, 2))
    torch.testing.assert_close(fastcnn.functional.conv_transpose2d(x[0], w, b, 2),
                               stock(x[0], w, b, 2, 0, 0, 1, 1, None), atol=0, rtol=0)
    assert fastcnn.functional.conv_transpose2d(x[:0], w, b, 2).shape == (0, 4, 10, 10)


# ---------------------------------------------------------------------------------------------------------------------
# The C++ stride-phase split (kernel != stride: ordinary convolutions of the phases' sub-kernels, one strided bias +
# ReLU store), forced with FASTCNN_CONV_TRANSPOSE_PHASE_SPLIT=1 since the router keeps ATen's transposed convolution
# wherever the split is not measured faster (csrc/conv_transpose.cpp).


@pytest.fixture
def phase_split(monkeypatch):
    monkeypatch.setenv("FASTCNN_CONV_TRANSPOSE_PHASE_SPLIT", "1")


def phase_split_test(test):
    """Runs `test` with the phase split forced; it needs fastcnn._C."""
    return needs_cpp(pytest.mark.usefixtures("phase_split")(test))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@phase_split_test
def test_phase_split_matches_stock_exactly(device, case, channels_last):
    """Every dtype and activation; the cases include phases no tap reaches (k2s3), dilation and groups."""
    kernel, groups = case[0], case[5]
    for dtype in DTYPES + [torch.float64]:
        for activation in ("relu", None):
            x, w, b = (t.to(device) for t in integer_inputs(2, 2 * groups, 3 * groups, (5, 7), (kernel, kernel),
                                                            groups, dtype, channels_last))
            assert_exactly_stock("cuda" if device == "cuda" else "cpu", x, w, b, case_args(case, activation))


@phase_split_test
def test_the_phase_split_is_what_runs():
    """Only the split selects sub-kernel taps (index_select); ATen's transposed convolution does not."""
    x, w, b = integer_inputs(1, 3, 4, (5, 6), (4, 4))
    with fastcnn.use_backend("cpu"), torch.profiler.profile() as prof:
        fastcnn.functional.conv_transpose2d(x, w, b, 2, 1, activation="relu")
    assert any(e.name == "aten::index_select" for e in prof.events())


@pytest.mark.parametrize("case", [CASES[1], CASES[2], (3, 2, 1, 1, 2, 1)], ids=case_id)
@phase_split_test
def test_phase_split_gradcheck_float64(case):
    kernel, groups = case[0], case[5]
    x = torch.randn(1, 2 * groups, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2 * groups, 2, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2 * groups, dtype=torch.float64, requires_grad=True)
    with fastcnn.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda *t: fastcnn.functional.conv_transpose2d(*t, *case_args(case, "relu")),
                                        (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=case_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@phase_split_test
def test_phase_split_opcheck(device, case, channels_last):
    kernel, groups = case[0], case[5]
    x, w, b = (t.to(device).requires_grad_() for t in integer_inputs(2, 2 * groups, 2 * groups, (5, 4),
                                                                     (kernel, kernel), groups,
                                                                     channels_last=channels_last))
    stride, padding, output_padding, groups, dilation, act = case_args(case, "relu")
    torch.library.opcheck(torch.ops.fastcnn.conv_transpose2d_act,
                          (x, w, b, list(stride), list(padding), list(output_padding), groups, list(dilation), act))


# ---------------------------------------------------------------------------------------------------------------------
# torch.library registration, Hypothesis-drawn arguments and bad input


@needs_cpp
@pytest.mark.parametrize("device", DEVICES)
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
    assert_compiles_like_eager(layer, x, backend)



@given(data=st.data())
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
    assume(min(out_size) >= 1)
    x, w, b = integer_inputs(draw(st.integers(1, 3), "batch"), groups * draw(st.integers(1, 3), "c_in/g"),
                             groups * draw(st.integers(1, 3), "c_out/g"), size, kernel, groups,
                             draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])),
                             draw(st.booleans(), "channels_last"), bias=draw(st.booleans(), "bias"))
    backend = draw(st.sampled_from([b for b in backends_here("cpu") if b != "triton"]), "backend")
    assert_exactly_stock(backend, x, w, b, (stride, padding, output_padding, groups, dilation,
                                            draw(st.sampled_from([None, "relu"]), "activation")))


def _bad_inputs():
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
    x, w, b = mutate(*_bad_inputs())
    with fastcnn.use_backend(backend), pytest.raises(error, match=match):
        fastcnn.functional.conv_transpose2d(x, w, b, 2)


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
        fastcnn.functional.conv_transpose2d(*_bad_inputs(), **kwargs)


@needs_cpp
@pytest.mark.stock_routes
def test_small_cpu_calls_route_to_stock_by_kind_and_mode():
    """On CPU a call runs stock below SMALL_OUTPUT output elements of its kind (kernel == stride or not) and mode
    (training where autograd records it); larger calls, skip_stock_routes() and a forced backend run fastcnn's."""
    from fastcnn.ops.conv_transpose import SMALL_OUTPUT, runs_stock

    w_gemm, w_overlap = torch.randn(16, 16, 2, 2), torch.randn(16, 16, 4, 4)
    x = torch.randn(2, 16, 32, 32)  # 131072 output elements at stride 2
    assert SMALL_OUTPUT[True, "infer"] <= 2 * 16 * 64 * 64 < SMALL_OUTPUT[True, "train"]
    assert not runs_stock(x, w_gemm, None, (2, 2), 1)
    assert runs_stock(x.requires_grad_(), w_gemm, None, (2, 2), 1)
    with torch.no_grad():
        assert not runs_stock(x, w_gemm, None, (2, 2), 1)
    assert runs_stock(x.detach(), w_overlap, None, (2, 2), 1)
    assert not runs_stock(torch.randn(2, 16, 256, 256), w_overlap, None, (2, 2), 1)
    with fastcnn.ops.skip_stock_routes():
        assert not runs_stock(x, w_gemm, None, (2, 2), 1)
    with fastcnn.use_backend("cpu"):
        assert not runs_stock(x, w_gemm, None, (2, 2), 1)


@pytest.mark.stock_routes
@pytest.mark.parametrize("activation", [None, "relu"])
def test_routed_module_computes_exactly_as_stock(activation):
    """Where the route sends a call to stock, fastcnn.nn.ConvTranspose2d is nn.ConvTranspose2d (and an in-place
    ReLU): the same outputs and gradients bit for bit, output_size included."""
    stock = torch.nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1)
    ours = fastcnn.nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, activation=activation)
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    out, want = ours(x, output_size=(10, 10)), stock(x, output_size=(10, 10))
    want = want if activation is None else torch.relu(want)
    assert torch.equal(out, want) and "fastcnn" not in out.grad_fn.name()
    got = torch.autograd.grad(out.square().sum(), (x, ours.weight, ours.bias))
    for g, w in zip(got, torch.autograd.grad(want.square().sum(), (x, stock.weight, stock.bias))):
        assert torch.equal(g, w)
