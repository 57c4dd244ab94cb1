"""The pass/fail rule of parity verification (:func:`fastcnn.train.verify.verify`), with its per-dtype floors, in
one place.

A fused model and its stock twin start from the same weights and see the same batches; they differ only by rounding
(kernels that sum in another order; fastcnn's optimizer kernels agree with torch.optim's to a few ulps). The bound
is measured in the same run, as the test suite's 2×-stock-error rule: a *control* copy of the stock model, trained
with torch.optim beside them in the other memory format (NCHW <-> channels_last: the same math through other
convolution kernels, which round differently, as fastcnn's do) and with its weights perturbed by one unit roundoff of
the compute dtype after every step, shows how far rounding alone carries the run. (Weight noise alone was too weak a
control: two stock copies differing only in memory format drift apart as far as fused and stock do - under Adam by
about 10x lr within 5 steps, because Adam's m/sqrt(v) turns rounding-level gradients into O(1) steps.) The fused model
passes when, at every step t of the first ``PARITY_WINDOW`` steps,

    |loss_fused − loss_stock| / max(1, |loss_stock|)  ≤  PARITY_FACTOR · max_{s≤t} (the control's same drift)
                                                         + PARITY_FLOOR[dtype]

and its parameter difference after the window (max over parameters of max|p − p_stock| / max(1, max|p_stock|)) is
within the same multiple of the control's plus the floor.

Why a window: training is chaotic. A rounding-level difference stays at rounding level for some tens of steps and
then, at a moment no run can predict (a loss spike), grows by orders of magnitude: measured on the digits with SGD
(momentum 0.9) over 80 steps, the fused model's relative loss difference reached 1.6e-2 in one run and stayed at
3e-7 in another, with the control at 4e-6 and 2e-4. Beyond the window, drift measures the chaos rather than the
kernels, so it is reported (with both models' validation accuracy) but does not decide. A real bug (a dropped bias,
a wrong gradient, a missing weight-decay term) leaves the bound within the window's first steps;
tests/train/test_verify.py shows one being caught.
"""
import torch

PARITY_FACTOR = 2.0

# The part of the bound that does not scale with the control's drift: tests/_tolerances.ERROR_FLOOR's floors.
PARITY_FLOOR = {
    torch.float32: 1e-5,
    torch.bfloat16: 1.6e-2,
}

PARITY_WINDOW = 20

PRECISION_DTYPES = {"32": torch.float32, "bf16-mixed": torch.bfloat16}


def parity_bound(control_drift, dtype):
    """The largest drift allowed where the control drifted by ``control_drift``."""
    return PARITY_FACTOR * control_drift + PARITY_FLOOR[dtype]
