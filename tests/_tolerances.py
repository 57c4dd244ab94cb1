"""The one tolerance table of the test suite, and the comparisons built on it.

Low-precision results follow flash-attention's rule: fastcnn's error against a float64 oracle may be at most twice
stock PyTorch's error at the same precision, plus a floor (relative to the oracle's magnitude) for the cases where
stock happens to be exact.
"""
import torch

# dtype -> floor of the allowed error, relative to max(1, max |oracle|).
ERROR_FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def _max_error(result, oracle):
    diff = (result.double() - oracle).abs()
    both_nan = torch.isnan(result.double()) & torch.isnan(oracle)
    return torch.where(both_nan, torch.zeros_like(diff), diff).nan_to_num(nan=float("inf")).max().item()


def assert_close_to_oracle(result, stock, oracle, name=""):
    """result (fastcnn) and stock (PyTorch), same dtype, against a float64 oracle."""
    assert result.shape == oracle.shape, f"{name}: shape {tuple(result.shape)} != {tuple(oracle.shape)}"
    if oracle.numel() == 0:
        return
    scale = max(1.0, oracle.nan_to_num().abs().max().item())
    allowed = 2 * _max_error(stock, oracle) + ERROR_FLOOR[result.dtype] * scale
    error = _max_error(result, oracle)
    assert error <= allowed, f"{name}: error {error:.3g} > allowed {allowed:.3g} ({result.dtype})"
