"""Hypothesis-drawn shapes for the fused block, on integer data so the comparison with stock PyTorch is exact."""
import pytest

pytest.importorskip("hypothesis")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from _blocks import POOL_CASES, backends_here, integer_inputs  # noqa: E402
from test_conv_relu_pool import DTYPES, assert_exactly_stock  # noqa: E402

BACKENDS = [b for b in backends_here("cpu") if b != "triton"]  # the interpreter is too slow for many examples


@given(data=st.data())
def test_random_shapes_match_stock_exactly(data):
    """Hypothesis-drawn shapes: odd and prime sizes, groups, dilation, strides, 1x1 kernels, batch 1."""
    groups = data.draw(st.sampled_from([1, 2, 3]), "groups")
    c_in = groups * data.draw(st.integers(1, 4), "c_in per group")
    c_out = groups * data.draw(st.integers(1, 4), "c_out per group")
    kernel = data.draw(st.tuples(st.sampled_from([1, 2, 3, 5]), st.sampled_from([1, 2, 3])), "kernel")
    stride = data.draw(st.tuples(st.integers(1, 3), st.integers(1, 3)), "stride")
    padding = data.draw(st.tuples(st.integers(0, 2), st.integers(0, 2)), "padding")
    dilation = data.draw(st.tuples(st.integers(1, 2), st.integers(1, 2)), "dilation")
    pool, pool_size, pool_stride = data.draw(st.sampled_from(POOL_CASES + [("max", (3, 3), (2, 2))]), "pool")
    min_size = [dilation[i] * (kernel[i] - 1) + 1 - 2 * padding[i] + stride[i] * (pool_size[i] - 1) for i in (0, 1)]
    size = tuple(data.draw(st.integers(max(1, min_size[i]), 17), f"size{i}") for i in (0, 1))
    batch = data.draw(st.sampled_from([1, 2, 3]), "batch")
    dtype = data.draw(st.sampled_from(DTYPES), "dtype")
    channels_last = data.draw(st.booleans(), "channels_last")
    backend = data.draw(st.sampled_from(BACKENDS), "backend")
    x, w, b = integer_inputs(batch, c_in, c_out, size, kernel, groups, dtype, channels_last,
                             bias=data.draw(st.booleans(), "bias"))
    assert_exactly_stock(backend, x, w, b, stride, padding, dilation, groups, pool, pool_size, pool_stride)
