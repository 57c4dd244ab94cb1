"""Learning-rate schedules for large-batch training: linear warmup, then polynomial decay (TF TPU's
``poly_rate_schedule``, MLPerf ResNet-50's ``lr_decay_poly_power=2``)."""
import torch


def warmup_polynomial_factor(step, warmup_steps, total_steps, power=2.0, end_factor=0.0):
    """The multiplier of the base learning rate at (0-based) ``step``.

    Warmup, ``step < warmup_steps``: (step + 1) / warmup_steps, rising linearly to 1 at the last warmup step.
    Decay: end_factor + (1 − end_factor)·(1 − (step − warmup_steps) / (total_steps − warmup_steps))^power, which is 1
    at ``step = warmup_steps`` and ``end_factor`` from ``total_steps`` on.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return end_factor + (1.0 - end_factor) * (1.0 - progress) ** power


def warmup_polynomial_decay(optimizer, warmup_steps, total_steps, power=2.0, end_factor=0.0, last_epoch=-1):
    """A ``torch.optim.lr_scheduler.LambdaLR`` doing linear warmup, then polynomial decay.

    Call ``scheduler.step()`` once per optimizer step; the factor at step t is
    :func:`warmup_polynomial_factor` (t, ...), applied to each param group's initial lr.

    Args:
        optimizer (torch.optim.Optimizer): any optimizer (LARS is the usual one).
        warmup_steps (int): steps of linear warmup (0: none).
        total_steps (int): the step at which the decay reaches ``end_factor``; > warmup_steps.
        power (float): power of the decay (default 2, as the large-batch ResNet-50 recipes).
        end_factor (float): final multiplier of the base lr (default 0).
        last_epoch (int): as LambdaLR (-1 to start).

    Example:
        >>> opt = fastcnn.optim.LARS(model.parameters(), lr=10.0, weight_decay=5e-5)
        >>> sched = fastcnn.optim.warmup_polynomial_decay(opt, warmup_steps=5 * steps_per_epoch,
        ...                                               total_steps=90 * steps_per_epoch)
        >>> for batch in loader: ...; opt.step(); sched.step()
    """
    if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
        raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if not (isinstance(total_steps, int) and total_steps > warmup_steps):
        raise ValueError(f"total_steps must be an int > warmup_steps ({warmup_steps}), got {total_steps!r}")
    if not power > 0:
        raise ValueError(f"power must be > 0, got {power!r}")
    if not 0.0 <= end_factor <= 1.0:
        raise ValueError(f"end_factor must be in [0, 1], got {end_factor!r}")

    def factor(step):
        return warmup_polynomial_factor(step, warmup_steps, total_steps, power, end_factor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=last_epoch)
