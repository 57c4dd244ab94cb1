"""The CPU 3x3 convolution by Winograd's F(2x2, 3x3) (csrc/cpu/winograd.cpp), which the fused conv block runs in
place of oneDNN's direct convolution where it was measured faster: outputs and all three gradients against a
float64 oracle within the tolerance table, at every padding it takes and at odd sizes (partial edge tiles); that it
runs where its rule says and nowhere else (the profiler names it); results that repeat and agree across thread
counts; NaN and infinity reach the same outputs as stock's."""
import pytest
import torch
import torch.nn.functional as F

import fastcnn
from fastcnn import _extension

from fastcnn.ops.conv2d import WINOGRAD_WEIGHT_GRAD_MIN_CHANNELS, winograd_runs, winograd_weight_grad_runs

from _blocks import forward_backward, stock
from _tolerances import assert_close_to_oracle

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason="fastcnn._C is not built")

# (N, C_in, C_out, H, W, padding, channels_last): each channels_last with 64 channels on both sides and enough 2x2
# output tiles, so the rule picks Winograd: narrow filters by blocks of at least 256 tiles with tiles * C_in * C_out
# >= 2^21, wide ones (C_in * C_out >= 256 * 256) by columns of output channels from 96 tiles.
ELIGIBLE = [
    (2, 64, 64, 33, 31, 1, True),
    (1, 64, 96, 45, 33, 0, True),
    (2, 96, 64, 25, 27, 2, True),
    (1, 128, 160, 35, 33, 2, True),
    (2, 256, 256, 13, 15, 1, True),   # 112 tiles by columns: two of 128 channels
    (1, 160, 416, 19, 21, 1, True),   # 110 tiles by columns of 128 channels and a last of 32; the input gradient's
                                      # flipped filters (416 -> 160) by two of 80
]
# Just outside the rule: too little work, too few tiles, too few channels, NCHW, stride 2, 5x5, float64.
NOT_ELIGIBLE = [
    dict(shape=(1, 64, 64, 28, 28), padding=1, channels_last=True),         # 196 tiles * 64 * 64 < 2^21
    dict(shape=(1, 256, 256, 14, 14), padding=1, channels_last=True),       # 49 tiles
    dict(shape=(2, 32, 64, 40, 40), padding=1, channels_last=True),         # 32 input channels
    dict(shape=(2, 128, 128, 40, 40), padding=1, channels_last=False),      # NCHW
    dict(shape=(2, 64, 64, 40, 40), padding=1, channels_last=True, stride=2),
    dict(shape=(2, 64, 64, 40, 40), padding=2, channels_last=True, kernel=5),
    dict(shape=(2, 64, 64, 40, 40), padding=1, channels_last=True, dtype=torch.float64),
]


def _inputs(n, c_in, c_out, h, w, channels_last, kernel=3, dtype=torch.float32):
    x = torch.randn(n, c_in, h, w, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, kernel, kernel, dtype=dtype) * (2 / (kernel * kernel * c_in)) ** 0.5
    return x, weight, torch.randn(c_out, dtype=dtype) * 0.1


def _ran_winograd(fn, name="fastcnn::winograd_conv3x3"):
    """How many times `fn` ran the Winograd convolution (or, with `name`, another of its named kernels)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name == name for e in prof.events())


@pytest.mark.parametrize("case", ELIGIBLE, ids=lambda c: "x".join(map(str, c[:5])) + f"p{c[5]}" +
                         "nhwc")
@pytest.mark.parametrize("pool", ["max", "avg", "none"])
def test_forward_and_gradients_within_the_tolerance_table(case, pool):
    n, c_in, c_out, h, w, padding, channels_last = case
    x, weight, bias = _inputs(n, c_in, c_out, h, w, channels_last)
    args = ((1, 1), (padding, padding), (1, 1), 1, pool, (2, 2), (2, 2))
    oracle, grad_out, oracle_grads = forward_backward(lambda *t: stock(*t, *args),
                                                      (x.double(), weight.double(), bias.double()))
    grad_out = torch.randn(oracle.shape, dtype=torch.float64)  # continuous, so every gradient path is exercised
    oracle, _, oracle_grads = forward_backward(lambda *t: stock(*t, *args),
                                               (x.double(), weight.double(), bias.double()), grad_out)
    stock_out, _, stock_grads = forward_backward(lambda *t: stock(*t, *args), (x, weight, bias), grad_out.float())

    def fused():
        return forward_backward(lambda *t: fastcnn.functional.conv2d_relu_pool(*t, *args), (x, weight, bias),
                                grad_out.float())

    with fastcnn.use_backend("cpu"):
        assert _ran_winograd(fused) == 2  # the forward and the input gradient
        weight_grads = 1 if min(c_in, c_out) >= WINOGRAD_WEIGHT_GRAD_MIN_CHANNELS else 0
        assert _ran_winograd(fused, "fastcnn::winograd_conv3x3_weight_grad") == weight_grads
        out, _, grads = fused()
    assert_close_to_oracle(out, stock_out, oracle, "out")
    assert out.is_contiguous(memory_format=torch.channels_last)
    for name, got, ref, oracle_grad in zip(("input", "weight", "bias"), grads, stock_grads, oracle_grads):
        assert_close_to_oracle(got, ref, oracle_grad, f"grad {name}")
    assert grads[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("pool", ["max", "avg", "none"])
def test_nchw_runs_winograd_in_the_forward_with_a_2x2_max_pool_and_the_weight_gradient(pool):
    """NCHW input: Winograd's forward where the 2x2 max pool is taken in its output transform (on a channels_last
    copy of the input; the output comes back NCHW) and its weight gradient (more accurate than oneDNN's NCHW one),
    never its input gradient (oneDNN's NCHW one is more accurate than the benchmarks' rule lets Winograd's be). The
    output on random values within the tolerance table; the gradients on small integers, where every convolution is
    exact (Winograd's transforms only halve), so that a near-tie in a pool window cannot pick another element than
    float64 does and they must equal the oracle's."""
    x, weight, bias = _inputs(2, 128, 144, 33, 31, channels_last=False)
    args = ((1, 1), (1, 1), (1, 1), 1, pool, (2, 2), (2, 2))
    with torch.no_grad():
        oracle = stock(x.double(), weight.double(), bias.double(), *args)
        with fastcnn.use_backend("cpu"):
            out = fastcnn.functional.conv2d_relu_pool(x, weight, bias, *args)
        assert_close_to_oracle(out, stock(x, weight, bias, *args), oracle, "out")
    assert out.is_contiguous()

    x, weight, bias = x.round().clamp(-2, 2), (weight * 8).round().clamp(-1, 1), bias.mul(10).round()
    grad_out = torch.randint(-3, 4, oracle.shape, dtype=torch.float64)
    oracle, _, oracle_grads = forward_backward(lambda *t: stock(*t, *args),
                                               (x.double(), weight.double(), bias.double()), grad_out)

    def fused():
        return forward_backward(lambda *t: fastcnn.functional.conv2d_relu_pool(*t, *args), (x, weight, bias),
                                grad_out.float())

    with fastcnn.use_backend("cpu"):
        assert _ran_winograd(fused) == (1 if pool == "max" else 0)
        assert _ran_winograd(fused, "fastcnn::winograd_conv3x3_weight_grad") == 1  # more accurate than oneDNN's NCHW
        out, _, grads = fused()
    assert grads[0].is_contiguous() and grads[1].is_contiguous()
    torch.testing.assert_close(out.double(), oracle, rtol=0, atol=0)
    for name, got, exact in zip(("input", "weight", "bias"), grads, oracle_grads):
        torch.testing.assert_close(got.double(), exact, rtol=0, atol=0, msg=f"grad {name}")


@pytest.mark.parametrize("case", NOT_ELIGIBLE, ids=range(len(NOT_ELIGIBLE)))
def test_direct_convolution_outside_the_rule(case):
    stride, kernel, dtype = case.get("stride", 1), case.get("kernel", 3), case.get("dtype", torch.float32)
    x, weight, bias = _inputs(*case["shape"], case["channels_last"], kernel, dtype)
    p = case["padding"]
    with fastcnn.use_backend("cpu"), torch.no_grad():
        assert _ran_winograd(lambda: fastcnn.functional.conv2d_relu_pool(x, weight, bias, stride, p, pool="none")) == 0


# (N, C_in, C_out, H, W): one shape for each plan of the forward, by blocks of tiles and by columns of output
# channels (110 tiles, columns of 128, 128 and 32 channels).
PLANS = {"tiles": (2, 64, 80, 35, 29), "columns": (1, 256, 288, 21, 19)}


@pytest.mark.parametrize("shape", PLANS.values(), ids=PLANS.keys())
def test_results_repeat_and_agree_across_thread_counts(shape):
    """The work is split into blocks of tiles or columns of channels by the shapes alone. At one thread count a call
    repeats bitwise; across thread counts results agree within the tolerance table (MKL's AVX-512 sgemm gave bitwise
    the same results on 1-3 threads, its AVX2 kernels differed in the last bits at 3)."""
    x, weight, bias = _inputs(*shape, True)
    threads = torch.get_num_threads()
    outs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            with fastcnn.use_backend("cpu"), torch.no_grad():
                first = fastcnn.functional.conv2d_relu_pool(x, weight, bias, 1, 1, pool="none")
                assert torch.equal(first, fastcnn.functional.conv2d_relu_pool(x, weight, bias, 1, 1, pool="none"))
            outs.append(first)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        oracle = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), padding=1))
        stock_out = F.relu(F.conv2d(x, weight, bias, padding=1))
    for out in outs:
        assert_close_to_oracle(out, stock_out, oracle, "out")


@pytest.mark.parametrize("weight_format", [torch.contiguous_format, torch.channels_last], ids=["oihw", "ohwi"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_weight_gradient_of_wide_filters_sums_tiles_by_chunks(channels_last, weight_format):
    """Above 256 x 256 filters each position's GEMM reduces over a chunk of up to 512 tiles (winograd_backward.cpp):
    575 tiles here, so two chunks, the second adding to the first. Within the tolerance table in either filter
    layout (the back transform writes channels_last taps, or transposes them per output channel), and for NCHW
    input too, whose input gradient stays oneDNN's."""
    x, weight, bias = _inputs(1, 260, 264, 50, 46, channels_last)
    weight = weight.contiguous(memory_format=weight_format)
    args = ((1, 1), (1, 1), (1, 1), 1, "none", (2, 2), (2, 2))
    grad_out = torch.randn(1, 264, 50, 46, dtype=torch.float64)
    _, _, oracle_grads = forward_backward(lambda *t: stock(*t, *args), (x.double(), weight.double(),
                                                                           bias.double() + 100), grad_out)
    _, _, stock_grads = forward_backward(lambda *t: stock(*t, *args), (x, weight, bias + 100), grad_out.float())

    def fused():  # the bias keeps every ReLU open, so the gradient reaching the convolution is dense
        return forward_backward(lambda *t: fastcnn.functional.conv2d_relu_pool(*t, *args), (x, weight, bias + 100),
                                grad_out.float())

    with fastcnn.use_backend("cpu"):
        assert _ran_winograd(fused, "fastcnn::winograd_conv3x3_weight_grad") == 1
        assert _ran_winograd(fused) == (2 if channels_last else 0)  # forward and input gradient on NHWC only
        _, _, grads = fused()
    assert grads[1].is_contiguous(memory_format=weight_format)
    for name, got, ref, oracle_grad in zip(("input", "weight"), grads, stock_grads, oracle_grads):
        assert_close_to_oracle(got, ref, oracle_grad, f"grad {name}")


def test_weight_gradient_repeats_bitwise():
    """The weight gradient sums each thread's blocks into its own accumulator, then the accumulators: at one thread
    count the same blocks go to the same threads, so a call repeats bitwise."""
    x, weight, bias = _inputs(2, 64, 80, 35, 29, True)
    grad_out = torch.randn(2, 80, 35, 29)
    args = ((1, 1), (1, 1), (1, 1), 1, "none", (2, 2), (2, 2))
    with fastcnn.use_backend("cpu"):
        first, second = (forward_backward(lambda *t: fastcnn.functional.conv2d_relu_pool(*t, *args),
                                          (x, weight, bias), grad_out)[2][1] for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize("channels", [64, 256], ids=["tiles", "columns"])  # the forward's two plans
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("pool", ["none", "max"])  # "max": the pool in the output transform
def test_nonfinite_input_reaches_the_outputs_stock_reaches(value, pool, channels):
    x, weight, bias = _inputs(2 if channels == 64 else 1, channels, channels, 32, 34, True)
    x[0, 3, 0, 0] = value     # a tile corner
    x[0, 5, 17, 9] = value    # inside a tile
    x[0, 7, 31, 33] = value   # the far edge
    with torch.no_grad():
        expected = F.relu(F.conv2d(x, weight, bias, padding=1))
        expected = F.max_pool2d(expected, 2) if pool == "max" else expected
        with fastcnn.use_backend("cpu"):
            assert _ran_winograd(lambda: fastcnn.functional.conv2d_relu_pool(x, weight, bias, 1, 1, pool=pool))
            out = fastcnn.functional.conv2d_relu_pool(x, weight, bias, 1, 1, pool=pool)
    assert torch.equal(torch.isnan(out), torch.isnan(expected))
    assert torch.equal(torch.isinf(out), torch.isinf(expected))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_gradient_reaches_the_inputs_stock_reaches(value):
    x, weight, bias = _inputs(2, 64, 64, 32, 34, True)
    grad_out = torch.randn(2, 64, 32, 34)
    grad_out[0, 2, 0, 0] = value
    grad_out[0, 9, 20, 13] = -value
    args = ((1, 1), (1, 1), (1, 1), 1, "none", (2, 2), (2, 2))
    bias = bias + 100  # so that the ReLU passes every element and its gradient
    _, _, expected = forward_backward(lambda *t: stock(*t, *args), (x, weight, bias), grad_out)
    with fastcnn.use_backend("cpu"):
        _, _, grads = forward_backward(lambda *t: fastcnn.functional.conv2d_relu_pool(*t, *args),
                                       (x, weight, bias), grad_out)
    for check in (torch.isnan, torch.isinf):
        assert torch.equal(check(grads[0]), check(expected[0]))
        assert torch.equal(check(grads[1]), check(expected[1]))  # the weight gradient reruns ATen's


def _case_arguments(case):
    n, c_in, c_out, h, w = case["shape"]
    x, weight, bias = _inputs(n, c_in, c_out, h, w, case["channels_last"], case.get("kernel", 3),
                              case.get("dtype", torch.float32))
    p, s = case["padding"], case.get("stride", 1)
    return x, weight, bias, ((s, s), (p, p), (1, 1), 1)


AGREEMENT_CASES = NOT_ELIGIBLE + [dict(shape=c[:5], padding=c[5], channels_last=c[6]) for c in ELIGIBLE] + [
    dict(shape=(2, 64, 64, 32, 32), padding=1, channels_last=True),   # 512 tiles * 64 * 64 = 2^21: the threshold
    dict(shape=(2, 64, 64, 31, 32), padding=1, channels_last=True),   # 512 tiles, the last row partial
    dict(shape=(2, 64, 64, 30, 32), padding=1, channels_last=True),   # 480 tiles
    dict(shape=(1, 256, 255, 32, 31), padding=1, channels_last=True),  # 256 tiles of narrow filters: the minimum
    dict(shape=(1, 256, 255, 30, 32), padding=1, channels_last=True),  # 240 tiles of narrow filters
    dict(shape=(1, 256, 256, 24, 16), padding=1, channels_last=True),  # 96 tiles of wide filters: the minimum
    dict(shape=(1, 256, 256, 22, 16), padding=1, channels_last=True),  # 88 tiles
    dict(shape=(2, 256, 256, 44, 46), padding=1, channels_last=True),  # 1012 tiles: by columns
    dict(shape=(2, 256, 256, 46, 46), padding=1, channels_last=True),  # 1058 tiles: by blocks of tiles
]


@pytest.mark.parametrize("case", AGREEMENT_CASES, ids=range(len(AGREEMENT_CASES)))
def test_python_mirror_of_the_rule_agrees_with_the_kernel(case):
    """The route table's size class "winograd" (winograd_runs, Python) is the C++ rule (winograd_applies)."""
    x, weight, bias, conv = _case_arguments(case)
    with fastcnn.use_backend("cpu"), torch.no_grad():
        ran = _ran_winograd(lambda: fastcnn.functional.conv2d_relu_pool(x, weight, bias, *conv, pool="none")) > 0
    assert winograd_runs(x, weight, *conv) == ran


WEIGHT_GRAD_CASES = AGREEMENT_CASES + [
    dict(shape=(2, 64, 80, 33, 31), padding=1, channels_last=False),    # 64 channels: oneDNN's, in either layout
    dict(shape=(2, 127, 128, 33, 31), padding=1, channels_last=True),   # 127
    dict(shape=(2, 128, 128, 33, 31), padding=1, channels_last=False),  # 128: Winograd's from NCHW input too
]


@pytest.mark.parametrize("case", WEIGHT_GRAD_CASES, ids=range(len(WEIGHT_GRAD_CASES)))
def test_python_mirror_of_the_weight_gradient_rule_agrees_with_the_kernel(case):
    """winograd_weight_grad_runs (Python, the size class of training calls without a pool) is the C++ rule
    (weight_grad_fits in winograd_backward.cpp): Winograd's weight gradient where the forward's rule holds in any
    layout and both sides have at least 128 channels."""
    x, weight, bias, conv = _case_arguments(case)
    weight.requires_grad_()

    def backward():
        fastcnn.functional.conv2d_relu_pool(x, weight, bias, *conv, pool="none").sum().backward()

    with fastcnn.use_backend("cpu"):
        ran = _ran_winograd(backward, "fastcnn::winograd_conv3x3_weight_grad") > 0
    assert winograd_weight_grad_runs(x, weight, *conv) == ran


def test_conv_relu_module_runs_winograd_by_default_and_matches_stock():
    """A ConvReLU2d without a pool routes to stock on CPU, except where the convolution is Winograd's."""
    layer = fastcnn.nn.ConvReLU2d(64, 64, 3, padding=1)
    reference = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU())
    reference[0].load_state_dict(layer.state_dict())
    x = torch.randn(2, 64, 34, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert _ran_winograd(lambda: layer(x))
        out = layer(x)
        oracle = reference.double()(x.double())
        assert_close_to_oracle(out, reference.float()(x), oracle, "out")
        assert not _ran_winograd(lambda: layer(x[:, :, :16, :16]))  # 128 tiles: stock's layers


@pytest.mark.parametrize("shape", [(2, 64, 80, 33, 31), (1, 96, 64, 40, 38)], ids=str)
def test_pool_in_the_output_transform_equals_the_epilogue_pass(shape):
    """A 2x2 stride-2 max pool is taken in Winograd's output transform; its output and code must be exactly what
    the epilogue pass (fastcnn::bias_relu_pool) makes of the same convolution's ReLU output."""
    n, c_in, c_out, h, w = shape
    x, weight, bias = _inputs(n, c_in, c_out, h, w, True)
    x[0, :, 3:9, 4:10] = 0  # whole windows of equal values (the bias alone): ties for the code
    op = torch.ops.fastcnn.conv2d_relu_pool
    conv = ([1, 1], [1, 1], [1, 1], 1)
    with torch.no_grad():
        assert _ran_winograd(lambda: op(x, weight, bias, *conv, "max", [2, 2], [2, 2]))
        out, code = op(x, weight, bias, *conv, "max", [2, 2], [2, 2])
        relu_out, _ = op(x, weight, bias, *conv, "none", [1, 1], [1, 1])
        expected, expected_code = torch.ops.fastcnn.bias_relu_pool(relu_out, None, "max", [2, 2], [2, 2])
    assert torch.equal(out, expected) and torch.equal(code, expected_code)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_module_on_winograd_follows_every_state_change_like_stock():
    """The filters are transformed on every call (nothing derived from the weight is kept), so a fused module on
    the Winograd path equals stock's layers in eval after an optimizer step, a load_state_dict and a .data edit."""
    torch.manual_seed(0)
    fused = fastcnn.nn.ConvReLUPool2d(64, 64, 3, padding=1)
    stock_layers = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.MaxPool2d(2))
    stock_layers[0].load_state_dict(fused.state_dict())
    x = torch.randn(2, 64, 34, 32).contiguous(memory_format=torch.channels_last)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (fused, stock_layers)]

    def assert_eval_equal(what):
        fused.eval(), stock_layers.eval()
        with torch.no_grad():
            assert _ran_winograd(lambda: fused(x)), what
            oracle = stock_layers.double()(x.double())
            stock_out = stock_layers.float()(x)
            assert_close_to_oracle(fused(x), stock_out, oracle, what)

    for model, optimizer in zip((fused, stock_layers), optimizers):
        model.train()
        model(x).square().mean().backward()
        optimizer.step()
    assert_eval_equal("after an optimizer step")
    new_state = {"weight": torch.randn(64, 64, 3, 3) / 24, "bias": torch.randn(64)}
    fused.load_state_dict(new_state)
    stock_layers[0].load_state_dict(new_state)
    assert_eval_equal("after load_state_dict")
    with torch.no_grad():
        fused.weight.data.mul_(-1)
        stock_layers[0].weight.data.mul_(-1)
    assert_eval_equal("after a .data edit")
