"""Issue 15 items 2-5 on CPU: the launchers' precision choice under both of torch's precision APIs, TF32 rounding,
average pools divided as ATen divides, grids within CUDA's limits. Values run under Triton's interpreter
(tests/conftest.py); what only a GPU shows is in the ``cuda``-marked tests at the end and in test_sm90_compile.py."""
import os
import sys

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastcnn.triton_kernels import _conv_common as common  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sm90_compile import Recorder, _conv_relu_pool_case  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRET, reason="value checks on CPU tensors run under TRITON_INTERPRET=1")


@pytest.fixture
def restore_precision():
    """Puts every precision flag back, through the newer API (the legacy getters may raise after a test)."""
    names = [("generic", torch.backends), ("cudnn", torch.backends.cudnn), ("conv", torch.backends.cudnn.conv),
             ("rnn", torch.backends.cudnn.rnn), ("matmul", torch.backends.cuda.matmul)]
    saved = [(obj, obj.fp32_precision) for _, obj in names]
    yield
    for obj, value in saved:
        obj.fp32_precision = value


CUDA = torch.device("meta")  # any non-CPU device: the launchers read cuDNN's setting for it (no GPU needed)


def test_precision_legacy_api(restore_precision):
    torch.backends.cudnn.allow_tf32 = True
    assert common.conv_allows_tf32(CUDA)
    torch.backends.cudnn.allow_tf32 = False
    assert not common.conv_allows_tf32(CUDA)


@pytest.mark.parametrize("setting, tf32", [
    (("generic", "ieee"), False),  # issue 15 item 2: made allow_tf32 (and every fp32 Triton conv) raise
    (("conv", "ieee"), False), (("conv", "tf32"), True), (("cudnn", "ieee"), False),
    (("generic", "tf32"), True),
])
def test_precision_new_api(restore_precision, setting, tf32):
    where, value = setting
    target = {"generic": torch.backends, "cudnn": torch.backends.cudnn, "conv": torch.backends.cudnn.conv}[where]
    if where != "conv":
        torch.backends.cudnn.conv.fp32_precision = "none"  # inherit, as after a fresh start with the new API
    target.fp32_precision = value
    assert common.conv_allows_tf32(CUDA) is tf32
    flags = common.dot_flags(torch.empty(1, device=CUDA))
    assert flags["TF32"] is tf32 and flags["IEEE"] is (not tf32)


def test_precision_mixed_apis_never_raise(restore_precision):
    torch.backends.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    with pytest.raises(RuntimeError):  # what the launchers used to read
        torch.backends.cudnn.allow_tf32
    assert common.conv_allows_tf32(CUDA)


def test_precision_per_dtype_and_device(restore_precision):
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    for dtype in (torch.float16, torch.bfloat16):
        flags = common.dot_flags(torch.empty(1, dtype=dtype, device=CUDA))
        assert not flags["TF32"] and not flags["IEEE"]
    # CPU tensors (the interpreter's) are compared with stock CPU convolutions, which are IEEE fp32
    assert common.dot_flags(torch.empty(1))["IEEE"] and not common.dot_flags(torch.empty(1))["TF32"]


def _tf32_rna(x):
    """cvt.rna.tf32.f32 in torch: round the fp32 bits to 10 mantissa bits, ties away from zero; inf/NaN kept."""
    u = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    r = (u + 0x1000) & 0xFFFFE000
    keep = (u & 0x7F800000) == 0x7F800000
    out = torch.where(keep, u, r)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32).view(torch.float32)


@interpreted
def test_round_tf32_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, common._round_tf32(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)

    one = 1.0
    ulp = 2.0 ** -10
    special = [one + ulp / 2, -(one + ulp / 2), one + ulp / 2 - 2.0 ** -23, one + 1.5 * ulp, 3.4028235e38, -0.0,
               float("inf"), float("-inf"), float("nan"), 1e-40, 0.1, -0.3]
    x = torch.cat([torch.tensor(special), torch.randn(500) * 100])
    y = torch.empty_like(x)
    kernel[(1,)](x, y, x.numel(), BLOCK=1024)
    assert torch.equal(y.view(torch.int32), _tf32_rna(x).view(torch.int32))
    assert y[0] == one + ulp and y[1] == -(one + ulp) and y[2] == one and y[3] == one + 2 * ulp  # away, not even
    assert y[4] == float("inf")


@interpreted
def test_tf32_conv_rounds_operands(monkeypatch):
    # The TF32 path (forced on CPU): the result is the convolution of the TF32-ROUNDED operands, not truncated ones.
    from fastcnn.triton_kernels.conv_relu_pool import conv2d_relu_pool_forward

    monkeypatch.setattr(common, "conv_allows_tf32", lambda device: True)
    x = torch.randn(2, 5, 7, 6)
    w = torch.randn(4, 5, 3, 3)
    out = torch.empty(2, 4, 5, 4)
    conv2d_relu_pool_forward(x, w, None, (1, 1), (0, 0), (1, 1), 1, "none", (1, 1), (1, 1), out, torch.empty(0))
    rounded = F.relu(F.conv2d(_tf32_rna(x).double(), _tf32_rna(w).double()))
    truncated = F.relu(F.conv2d((x.view(torch.int32) & -8192).view(torch.float32).double(),
                                (w.view(torch.int32) & -8192).view(torch.float32).double()))
    err_round = (out.double() - rounded).abs().max().item()
    err_trunc = (out.double() - truncated).abs().max().item()
    assert err_round < 1e-5 and err_trunc > 10 * err_round, (err_round, err_trunc)


@interpreted
@pytest.mark.parametrize("window", [(1, 3), (1, 5), (2, 3), (1, 7), (2, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_avg_pool_equals_aten(window, channels_last):
    # Small integers make the convolution and the window sums exact, so only the final division can differ.
    from fastcnn.triton_kernels.conv_relu_pool import conv2d_relu_pool_forward

    gen = torch.Generator().manual_seed(sum(window))
    x = torch.randint(-3, 4, (2, 3, 9, 15), generator=gen).float()
    w = torch.randint(-2, 3, (5, 3, 3, 3), generator=gen).float()
    b = torch.randint(-4, 5, (5,), generator=gen).float()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, w = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
    expected = F.avg_pool2d(F.relu(F.conv2d(x, w, b, padding=1)), window, window)
    out = torch.empty_like(expected)
    code = torch.empty(expected.shape, dtype=torch.uint8)
    conv2d_relu_pool_forward(x, w, b, (1, 1), (1, 1), (1, 1), 1, "avg", window, window, out, code)
    assert torch.equal(out, expected)


def test_large_depthwise_grids_within_cuda_limits():
    # issue 15 item 5: the weight gradient's taps x groups (7*7*2048 = 100,352) ran along grid y (limit 65,535)
    rec = Recorder("depthwise")
    _conv_relu_pool_case(rec, torch.float32, True, 2, 2048, 2048, 14, 7, 1, 3, 1, 2048, "none", 1, 1)
    kernels = {kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel): grid
               for _, kernel, grid, _, _ in rec.launches}
    assert any("wgrad" in name for name in kernels)
    for name, grid in kernels.items():
        assert grid[0] < 2**31 and all(g <= 65_535 for g in grid[1:]), (name, grid)


def test_grid_over_limit_is_a_clear_error():
    with pytest.raises(ValueError, match="grid axis z"):
        _conv_relu_pool_case(Recorder("huge groups"), torch.float32, False, 1, 70_000, 70_000, 4, 1, 1, 0, 1,
                             70_000, "none", 1, 1)


# ---------------------------------------------------------------------------------------------------------------
# on a GPU: the compiled TF32 / IEEE paths against stock cuDNN under each setting


def _stock_vs_fused(precision):
    from fastcnn.triton_kernels.conv_relu_pool import conv2d_relu_pool_forward

    torch.backends.cudnn.conv.fp32_precision = precision
    x = torch.randn(8, 64, 28, 28, device="cuda")
    w = torch.randn(64, 64, 3, 3, device="cuda") / 24
    out = torch.empty(8, 64, 14, 14, device="cuda")
    code = torch.empty(out.shape, dtype=torch.uint8, device="cuda")
    conv2d_relu_pool_forward(x, w, None, (1, 1), (1, 1), (1, 1), 1, "avg", (2, 2), (2, 2), out, code)
    stock = F.avg_pool2d(F.relu(F.conv2d(x, w, padding=1)), 2)
    exact = F.avg_pool2d(F.relu(F.conv2d(x.double(), w.double(), padding=1)), 2)
    return (out.double() - exact).abs().max().item(), (stock.double() - exact).abs().max().item()


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["tf32", "ieee"])
def test_cuda_precision_matches_stock(restore_precision, precision):
    fused_err, stock_err = _stock_vs_fused(precision)
    assert fused_err <= 2 * stock_err + 1e-7, (fused_err, stock_err)
    if precision == "ieee":
        assert fused_err < 1e-5
