"""Issue 15.7: fastcnn::conv_transpose2d_act checks its bias in C++ before any kernel reads bias[c] through a raw
pointer (called directly through torch.ops, no Python check runs first). Before the check, a bias of the wrong
length was read out of bounds on CPU, and a CPU bias beside CUDA tensors would have handed the CUDA kernel a host
pointer. CPU cases run everywhere; the CUDA cases need a GPU (marked)."""
import pytest
import torch
import torch.nn.functional as F

import fastcnn  # noqa: F401  (registers torch.ops.fastcnn)
from fastcnn import _extension

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason="fastcnn._C is not built")


def _call(x, w, b, stride=(2, 2), activation="relu", groups=1):
    return torch.ops.fastcnn.conv_transpose2d_act(x, w, b, list(stride), [0, 0], [0, 0], groups, [1, 1], activation)


# The issue's repro (kernel == stride: the GEMM + phase-store path), the ATen path (kernel != stride) with and
# without the activation, and a grouped weight whose output channel count is weight.size(1) * groups.
CASES = [
    pytest.param((1, 2, 3, 3), (2, 4, 2, 2), (2, 2), 1, "relu", id="k2s2-relu"),
    pytest.param((1, 2, 3, 3), (2, 4, 3, 3), (2, 2), 1, "relu", id="k3s2-relu"),
    pytest.param((1, 2, 3, 3), (2, 4, 3, 3), (2, 2), 1, "none", id="k3s2-none"),
    pytest.param((1, 4, 3, 3), (4, 3, 2, 2), (2, 2), 2, "relu", id="grouped"),
]


def _inputs(x_shape, w_shape, device="cpu"):
    return torch.randn(x_shape, device=device), torch.randn(w_shape, device=device)


@pytest.mark.parametrize("x_shape, w_shape, stride, groups, activation", CASES)
@pytest.mark.parametrize("length", [1, 0, "short", "long"])
def test_bias_of_the_wrong_length_is_refused(x_shape, w_shape, stride, groups, activation, length):
    x, w = _inputs(x_shape, w_shape)
    c_out = w.shape[1] * groups
    n = {"short": c_out - 1, "long": c_out + 1}.get(length, length)
    with pytest.raises(RuntimeError, match=rf"bias must have shape \({c_out}\)"):
        _call(x, w, torch.zeros(n), stride, activation, groups)


def test_issue_repro_is_refused():
    with pytest.raises(RuntimeError, match=r"bias must have shape \(4\)"):
        torch.ops.fastcnn.conv_transpose2d_act(torch.randn(1, 2, 3, 3), torch.randn(2, 4, 2, 2), torch.zeros(1),
                                               [2, 2], [0, 0], [0, 0], 1, [1, 1], "relu")


def test_bias_of_another_rank_or_dtype_is_refused():
    x, w = _inputs((1, 2, 3, 3), (2, 4, 2, 2))
    with pytest.raises(RuntimeError, match="bias must have shape"):
        _call(x, w, torch.zeros(1, 4))
    with pytest.raises(RuntimeError, match="bias must have the input's dtype"):
        _call(x, w, torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("x_shape, w_shape, stride, groups, activation", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_right_bias_still_matches_stock(x_shape, w_shape, stride, groups, activation, dtype):
    x, w = (t.to(dtype) for t in _inputs(x_shape, w_shape))
    b = torch.randn(w.shape[1] * groups, dtype=dtype)
    out = _call(x, w, b, stride, activation, groups)
    ref = F.conv_transpose2d(x.double(), w.double(), b.double(), stride, groups=groups)
    ref = (ref.relu() if activation == "relu" else ref).to(dtype)
    torch.testing.assert_close(out, ref, **({} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.02}))


def test_a_float32_bias_beside_bfloat16_input_is_read_as_float32():
    """The accumulation dtype is accepted (as by bias_relu_pool) and gives the same result as the converted bias."""
    x, w = (t.bfloat16() for t in _inputs((1, 2, 3, 3), (2, 4, 3, 3)))
    b = torch.randn(4)
    for activation in ("relu", "none"):
        out = _call(x, w, b, activation=activation)
        assert out.dtype == torch.bfloat16
        ref = F.conv_transpose2d(x.double(), w.double(), b.double(), 2)
        ref = ref.relu() if activation == "relu" else ref
        torch.testing.assert_close(out.double(), ref, atol=0.1, rtol=0.02)


@pytest.mark.cuda
@pytest.mark.parametrize("x_shape, w_shape, stride, groups, activation", CASES)
def test_cuda_a_cpu_bias_is_refused(x_shape, w_shape, stride, groups, activation):
    x, w = _inputs(x_shape, w_shape, "cuda")
    with pytest.raises(RuntimeError, match="bias must be on the input's device"):
        _call(x, w, torch.zeros(w.shape[1] * groups), stride, activation, groups)


@pytest.mark.cuda
@pytest.mark.parametrize("x_shape, w_shape, stride, groups, activation", CASES)
def test_cuda_bias_of_the_wrong_length_is_refused(x_shape, w_shape, stride, groups, activation):
    x, w = _inputs(x_shape, w_shape, "cuda")
    with pytest.raises(RuntimeError, match="bias must have shape"):
        _call(x, w, torch.zeros(1, device="cuda"), stride, activation, groups)
    torch.cuda.synchronize()
