"""The C++ stride-phase split of the transposed convolution (kernel != stride: ordinary convolutions of the phases'
sub-kernels, one strided bias + ReLU store), forced with FASTCNN_CONV_TRANSPOSE_PHASE_SPLIT=1 since the router keeps
ATen's transposed convolution wherever the split is not measured faster (csrc/conv_transpose.cpp)."""
import pytest
import torch
from _transpose_cases import CASES, assert_exactly_stock, case_id, integer_inputs

import fastcnn
from fastcnn import _extension

pytestmark = pytest.mark.skipif(not _extension.LOADED, reason="fastcnn._C is not built")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(autouse=True)
def _force_phase_split(monkeypatch):
    monkeypatch.setenv("FASTCNN_CONV_TRANSPOSE_PHASE_SPLIT", "1")


def _args(case, activation):
    _, stride, padding, output_padding, dilation, groups = case
    return (stride,) * 2, (padding,) * 2, (output_padding,) * 2, groups, (dilation,) * 2, activation


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_stock_exactly(device, case, channels_last):
    """Every dtype and activation; the cases include phases no tap reaches (k2s3), dilation and groups."""
    kernel, groups = case[0], case[5]
    for dtype in DTYPES:
        for activation in ("relu", None):
            x, w, b = (t.to(device) for t in integer_inputs(2, 2 * groups, 3 * groups, (5, 7), (kernel, kernel),
                                                            groups, dtype, channels_last))
            assert_exactly_stock("cuda" if device == "cuda" else "cpu", x, w, b, _args(case, activation))


def test_the_phase_split_is_what_runs():
    """Only the split selects sub-kernel taps (index_select); ATen's transposed convolution does not."""
    x, w, b = integer_inputs(1, 3, 4, (5, 6), (4, 4))
    with fastcnn.use_backend("cpu"), torch.profiler.profile() as prof:
        fastcnn.functional.conv_transpose2d(x, w, b, 2, 1, activation="relu")
    assert any(e.name == "aten::index_select" for e in prof.events())


@pytest.mark.parametrize("case", [CASES[1], CASES[2], (3, 2, 1, 1, 2, 1)], ids=case_id)
def test_gradcheck_float64(case):
    kernel, groups = case[0], case[5]
    x = torch.randn(1, 2 * groups, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2 * groups, 2, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2 * groups, dtype=torch.float64, requires_grad=True)
    with fastcnn.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda *t: fastcnn.functional.conv_transpose2d(*t, *_args(case, "relu")),
                                        (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=case_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck(device, case, channels_last):
    kernel, groups = case[0], case[5]
    x, w, b = (t.to(device).requires_grad_() for t in integer_inputs(2, 2 * groups, 2 * groups, (5, 4),
                                                                     (kernel, kernel), groups,
                                                                     channels_last=channels_last))
    stride, padding, output_padding, groups, dilation, act = _args(case, "relu")
    torch.library.opcheck(torch.ops.fastcnn.conv_transpose2d_act,
                          (x, w, b, list(stride), list(padding), list(output_padding), groups, list(dilation), act))
