"""fastcnn.train.schedules against torch.optim.lr_scheduler, value by value."""
import pytest
import torch
from torch.optim import lr_scheduler

from fastcnn.optim import warmup_polynomial_decay
from fastcnn.train.schedules import build_scheduler

LR = 0.4


def _optimizer():
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)


def _values(scheduler, steps):
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return values


CASES = {
    "step": (dict(step_size=7, gamma=0.3), lambda opt: lr_scheduler.StepLR(opt, 7, 0.3)),
    "cosine": (dict(total=50, warmup=5, warmup_start=0.1, min_factor=0.01),
               lambda opt: lr_scheduler.SequentialLR(opt, [lr_scheduler.LinearLR(opt, 0.1, 1.0, total_iters=5),
                                                           lr_scheduler.CosineAnnealingLR(opt, 45, eta_min=0.01 * LR)],
                                                     milestones=[5])),
    "cyclic": (dict(step_size=6, min_factor=0.25),
               lambda opt: lr_scheduler.CyclicLR(opt, 0.25 * LR, LR, step_size_up=6, cycle_momentum=False)),
    "poly": (dict(total=40, warmup=8, power=2.0, min_factor=0.05),
             lambda opt: warmup_polynomial_decay(opt, 8, 40, power=2.0, end_factor=0.05)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_matches_torch(name):
    options, torch_scheduler = CASES[name]
    steps = options.get("total", 60)  # past T_max torch's cosine rises again; ours stays at its minimum
    ours = _values(build_scheduler(_optimizer(), name, **options), steps)
    theirs = _values(torch_scheduler(_optimizer()), steps)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


def test_bad_schedule_arguments_are_named():
    with pytest.raises(ValueError, match="schedule"):
        build_scheduler(_optimizer(), "exponential")
    with pytest.raises(ValueError, match="total"):
        build_scheduler(_optimizer(), "cosine", warmup=5)
    with pytest.raises(ValueError, match="step_size"):
        build_scheduler(_optimizer(), "step", step_size=0)
