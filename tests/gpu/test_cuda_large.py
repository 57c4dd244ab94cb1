"""Issue 15.10's 64-bit fallback on the GPU: the elementwise kernels switch from 32-bit IntDivider index math to int64
division at 2^31 elements; these cases (just over 2^31 elements, bf16: ~4.3 GB per tensor, ~13 GB in all) check the
64-bit path's results at the start, around 2^31 and at the end against torch computing the same formula. Marked
`cuda` and `large`: scripts/gpu_check.sh runs them in proof2."""
import pytest
import torch

import fastcnn  # noqa: F401
from fastcnn import _extension

pytestmark = [pytest.mark.cuda, pytest.mark.large,
              pytest.mark.skipif(not _extension.WITH_CUDA, reason="fastcnn._C was built without CUDA kernels")]
ops = torch.ops.fastcnn


def _shape(channels_last):
    # 2 * 8 * 11587 * 11587 = 2,148,137,104 > 2^31, odd H and W so that every divisor matters.
    return (2, 8, 11587, 11587)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_scale_shift_add_relu_over_2_31_elements(channels_last):
    shape = _shape(channels_last)
    assert torch.Size(shape).numel() > 2 ** 31
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=fmt)
    scale = torch.rand(shape[1], device="cuda") + 0.5
    shift = torch.randn(shape[1], device="cuda")
    out, _ = ops.scale_shift_add_relu(x, scale, shift, None, False)
    for n, h in ((0, 0), (1, shape[2] // 2), (1, shape[2] - 1)):  # whole rows: both layouts, every channel
        row = x[n, :, h].float()
        expected = torch.relu((row * scale[:, None] + shift[:, None]).bfloat16().float()).bfloat16()
        got = out[n, :, h]
        torch.testing.assert_close(got, expected, rtol=0.01, atol=0.01)
    del out
    store = torch.empty_like(x)
    ops.scale_shift_relu_out(x, scale, shift, store)
    for n, h in ((0, 0), (1, shape[2] // 2), (1, shape[2] - 1)):
        row = x[n, :, h].float()
        expected = torch.relu(row * scale[:, None] + shift[:, None]).bfloat16()
        torch.testing.assert_close(store[n, :, h], expected, rtol=0.01, atol=0.01)


def test_phase_store_over_2_31_elements():
    """conv_transpose2d_act's k == s path (GEMM + phase store) with an output of > 2^31 elements."""
    x = torch.randn(2, 4, 5794, 5794, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(4, 8, 2, 2, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8, device="cuda", dtype=torch.bfloat16)
    out = ops.conv_transpose2d_act(x, w, b, [2, 2], [0, 0], [0, 0], 1, [1, 1], "relu")
    assert out.numel() > 2 ** 31
    for n, r in ((0, 0), (1, 5793)):
        ref = torch.nn.functional.conv_transpose2d(x[n:n + 1, :, r:r + 1].float(), w.float(), b.float(), 2).relu()
        got = out[n:n + 1, :, 2 * r:2 * r + 2].float()
        torch.testing.assert_close(got, ref, rtol=0.02, atol=0.05)
