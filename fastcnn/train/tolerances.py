"""The pass/fail rule of parity verification (:func:`fastcnn.train.verify.verify`), with its per-dtype floors, in
one place.

A fused model and its stock twin differ only by rounding (kernels that sum in another order; fastcnn's optimizer
kernels agree with torch.optim's to a few ulps). Verification is a *teacher-forced* lockstep: the stock model trains,
and before every step the fused model and a *control* (a copy of the stock model in the other memory format, NCHW <->
channels_last: the same math through other kernels, which round differently, as fastcnn's do) are given the stock
model's exact state (parameters, buffers, optimizer state). Each then runs the same step on the same batch, so what
is measured at step t is the difference one step of the kernels makes - never a difference that earlier steps grew.
(A free-running lockstep cannot tell rounding from a bug: training is chaotic, and a rounding-level difference grows
by orders of magnitude within a few steps - for resnet18 on 32 px digits, to 1e-2..1e-1 relative loss within 3-4
steps, for the control as for the fused model.) For each quantity the control's difference from the stock model
measures what rounding alone does, and the fused model passes when

    fused statistic  <=  PARITY_FACTOR * control statistic + PARITY_FLOOR[dtype]

(differences relative to max(1, max |stock value|)), with the statistic over the judged steps of ``STEP_STATISTIC``:

* ``loss`` (the step's forward loss) and ``buffers`` (BatchNorm running statistics after the step): continuous
  functions of the rounding, judged at their maximum over the steps. Integer buffers (``num_batches_tracked``) must
  be equal.
* ``updates`` (the parameters after the step): judged at their *median* over the steps. The gradient is not a
  continuous function of the rounding: a ReLU whose input lies within rounding of zero passes or drops its gradient
  as rounding decides, and a train-mode BatchNorm spreads that one element over its channel, changing the gradients
  below by about 1/(values per channel) of their size. Measured, resnet18 on 32 px digits, batch 32 (layer4's
  BatchNorms normalise 32 values per channel), seed 0, step 1: one pre-activation of layer4.0's output ReLU was
  5.3e-6 in float64; stock float32 rounded it below zero, the fused model did not; stock's own gradients were then
  11% off float64 (layer4.0.conv2.weight; 26% in channels_last), the fused model's 4e-6. Such flips are sporadic (in
  12 steps: 3 for the fused model, 7 for the control), a real gradient bug is in every step; the median tells them
  apart. Adaptive optimizers add a second such effect: a gradient that is mathematically zero (a conv bias before a
  BatchNorm) comes out as rounding noise or as an exact zero, and Adam/Adagrad scale it to a step of about lr
  whatever its size; the fused model's exact zero against stock's noise differs by about what the control's noise
  does (measured on tests/train/test_verify.py's net, seeds 0-2, median: Adam 3e-4 fused, 3.5e-4 to 5.5e-4 control;
  Adagrad 7e-3 to 8e-3 fused, 8e-3 to 1.2e-2 control).

Evaluation outputs are compared at checkpoints: the fused model in eval mode against a stock copy given the fused
model's own state (``eval``, judged at the maximum; so a fused model that evaluates stale weights fails), with the
control's output from the same state as the rounding measure; predictions may differ only where stock's top-two
logits are within twice the allowed output difference (``predictions``).
"""
import torch

PARITY_FACTOR = 2.0

# The part of the bound that does not scale with the control's difference: tests/_tolerances.ERROR_FLOOR's floors.
PARITY_FLOOR = {
    torch.float32: 1e-5,
    torch.bfloat16: 1.6e-2,
}

# Steps judged (None: every step of the run). Teacher forcing keeps chaos out of the measurement, so no window is
# needed; a number judges the first that many steps only.
PARITY_WINDOW = None

# The statistic over the judged steps of each per-step quantity (see the module docstring for why).
STEP_STATISTIC = {"loss": "max", "buffers": "max", "updates": "median"}

PRECISION_DTYPES = {"32": torch.float32, "bf16-mixed": torch.bfloat16}


def parity_bound(control_difference, dtype):
    """The largest difference allowed to the fused model where the control differed by ``control_difference``."""
    return PARITY_FACTOR * control_difference + PARITY_FLOOR[dtype]
