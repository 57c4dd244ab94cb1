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


# Optimizer lockstep (tests/optim): a fastcnn optimizer and torch.optim.X(fused=True), fed the same unit-variance
# gradients, may differ per tensor by this many units of eps(dtype) * max(1, max|torch's tensor|) at any step of a
# 100-step run (FMA contraction and op order differ slightly between the kernels, e.g. torch's CPU kernel updates
# exp_avg with a lerp; measured at most 2).
OPTIM_LOCKSTEP_ULPS = 4


def assert_lockstep(result, stock, name=""):
    """fastcnn's optimizer tensor against torch.optim's after the same steps (same dtype); see OPTIM_LOCKSTEP_ULPS."""
    assert result.dtype == stock.dtype and result.shape == stock.shape, f"{name}: {result.dtype} {stock.dtype}"
    if stock.numel() == 0:
        return
    unit = torch.finfo(stock.dtype).eps * max(1.0, stock.abs().max().item())
    error = (result.double() - stock.double()).abs().max().item()
    assert error <= OPTIM_LOCKSTEP_ULPS * unit, f"{name}: differs by {error / unit:.3g} ulps > {OPTIM_LOCKSTEP_ULPS}"
