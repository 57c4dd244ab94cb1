"""Learning-rate schedules as closed-form factors of the base lr (``torch.optim.lr_scheduler.LambdaLR``), so a
checkpoint needs only the step count and every value can be checked against torch's own schedulers:

* ``"constant"``: 1.
* ``"step"``: gamma^⌊t / step_size⌋ (torch's StepLR).
* ``"cosine"``: linear warmup from ``warmup_start`` to 1 over ``warmup`` steps (LinearLR), then
  min_factor + (1 − min_factor)·(1 + cos(π·(t − warmup)/(total − warmup)))/2 (CosineAnnealingLR with
  eta_min = min_factor·lr; SequentialLR of the two).
* ``"cyclic"``: triangular between min_factor·lr and lr, ``step_size`` steps up and as many down (CyclicLR).
* ``"poly"``: linear warmup then polynomial decay, the large-batch LARS schedule
  (:func:`fastcnn.optim.warmup_polynomial_factor`).

``t`` counts scheduler steps: epochs or optimizer steps, as the Trainer's ``scheduler_interval`` says.
"""
import math

import torch

SCHEDULES = ("constant", "step", "cosine", "cyclic", "poly")


def schedule_factor(name, t, *, total=None, step_size=30, gamma=0.1, warmup=0, warmup_start=0.1, min_factor=0.0,
                    power=2.0):
    """The factor of the base lr at scheduler step ``t`` (0-based); arguments as :func:`build_scheduler`."""
    if name == "constant":
        return 1.0
    if name == "step":
        return gamma ** (t // step_size)
    if name == "cosine":
        if t < warmup:
            return warmup_start + (1.0 - warmup_start) * t / warmup
        progress = min(t - warmup, total - warmup) / (total - warmup)
        return min_factor + (1.0 - min_factor) * (1.0 + math.cos(math.pi * progress)) / 2
    if name == "cyclic":
        cycle_position = abs(t / step_size - 2 * math.floor(1 + t / (2 * step_size)) + 1)
        return min_factor + (1.0 - min_factor) * max(0.0, 1.0 - cycle_position)
    if name == "poly":
        from fastcnn.optim import warmup_polynomial_factor

        return warmup_polynomial_factor(t, warmup, total, power, min_factor)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")


def build_scheduler(optimizer, name, *, total=None, step_size=30, gamma=0.1, warmup=0, warmup_start=0.1,
                    min_factor=0.0, power=2.0):
    """A LambdaLR over ``optimizer`` following schedule ``name``.

    Args:
        optimizer: any torch.optim optimizer; its lr is the peak (base) lr.
        name (str): one of ``"constant"``, ``"step"``, ``"cosine"``, ``"cyclic"``, ``"poly"``.
        total (int): scheduler steps in the run (cosine, poly).
        step_size (int): steps per decay (step) or per half cycle (cyclic).
        gamma (float): decay factor of ``"step"``.
        warmup (int): warmup steps (cosine, poly).
        warmup_start (float): factor at the first warmup step (cosine).
        min_factor (float): the lowest factor (cosine's eta_min, cyclic's base, poly's end).
        power (float): power of the polynomial decay.

    Example:
        >>> scheduler = build_scheduler(optimizer, "cosine", total=epochs, warmup=2)
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    if name in ("cosine", "poly") and not (isinstance(total, int) and total > warmup >= 0):
        raise ValueError(f"schedule {name!r} needs total (an int > warmup = {warmup}), got {total!r}")
    if name in ("step", "cyclic") and not (isinstance(step_size, int) and step_size >= 1):
        raise ValueError(f"step_size must be an int >= 1, got {step_size!r}")
    options = dict(total=total, step_size=step_size, gamma=gamma, warmup=warmup, warmup_start=warmup_start,
                   min_factor=min_factor, power=power)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: schedule_factor(name, t, **options))
