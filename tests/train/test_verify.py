"""Parity verification: a small fused CNN (conv+ReLU+pool, conv+BN+ReLU, a residual block) and its stock twin on the
8x8 digits pass on every seed and learn the digits; each planted bug fails the report: a stale eval fold, a wrong
BatchNorm momentum, a dropped bias. Every BatchNorm here normalises >= 1024 values per channel (batch 64, 4x4 maps),
so a ReLU input that rounding puts on the other side of zero moves a gradient by ~1e-3 of its size, not 1/32 (see
fastcnn.train.tolerances)."""
import copy
import types

import pytest
import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock as TorchvisionBasicBlock

import fastcnn
from fastcnn.data import digits, make_loader
from fastcnn.nn import residual
from fastcnn.train.tolerances import PARITY_FLOOR
from fastcnn.train.verify import ParityReport, verify

SGD = {"lr": 0.05, "momentum": 0.9}


def _stock_net():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # -> ConvReLUPool2d
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),  # -> ConvBNReLU2d + FusedBatchNorm2d
        TorchvisionBasicBlock(8, 8),  # -> fastcnn's fused BasicBlock
        nn.Flatten(), nn.Dropout(0.1), nn.Linear(8 * 4 * 4, 10))


def _pair(seed=0):
    """(fused, stock): the stock net seeded, and fastcnn.convert's fused twin of it."""
    torch.manual_seed(seed)
    stock = _stock_net()
    fused = fastcnn.convert(stock)
    kinds = (fastcnn.nn.ConvReLUPool2d, fastcnn.nn.ConvBNReLU2d, fastcnn.nn.FusedBatchNorm2d, fastcnn.nn.BasicBlock)
    assert all(isinstance(fused[i], kind) for i, kind in zip((0, 3, 4, 6), kinds))  # where the bugs are planted
    return fused, stock


@pytest.fixture(scope="module")
def digit_data():
    return digits(image_size=8, channels=1)


def _loaders(digit_data, seed=0):
    torch.manual_seed(seed)  # the shuffling order
    train, val = digit_data
    return make_loader(train, 64, shuffle=True), make_loader(val, 517)


def _verify(pair, loaders, steps=8, **kwargs):
    return verify(pair, *loaders, max_steps=steps, progress=False, **{**SGD, **kwargs})


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_seed_passes(digit_data, seed):
    report = _verify(_pair(seed), _loaders(digit_data, seed), steps=10, schedule="cosine")
    assert report.passed, report.format()
    assert len(report.loss_differences) == 10 and report.images == 640
    steps = ["loss (max over steps)", "buffers (max over steps)", "updates (median over steps)"]
    assert [c.name for c in report.checks()][:6] == steps + [f"routed: {name}" for name in steps]
    assert len(report.evaluations) == 8  # outputs and predictions of both fused sides, half way and at the end
    assert report.fewest_batch_norm_values == (64 * 4 * 4, "4")


def test_fused_and_stock_learn_the_digits_in_lockstep(digit_data):
    report = verify(_pair(), *_loaders(digit_data), epochs=3, progress=False, lr=0.1, momentum=0.9)
    assert report.passed, report.format()
    assert report.validation["fused"]["accuracy"] >= 0.9 and report.validation["stock"]["accuracy"] >= 0.9
    assert report.val_accuracy["fused in stock"] == report.val_accuracy["fused"], report.format()
    assert report.seconds["fused"] > 0 and report.seconds["stock"] > 0 and "PASS" in report.format()


def _plant(module, forward):
    """Replace ``module``'s forward by ``forward(self, x)``, bound so that verify's copy of the fused model (its
    routed side) gets the bug in its own copy of the module."""
    module.forward = types.MethodType(forward, module)


def _failed_checks(report):
    assert not report.passed and "FAIL" in report.format()
    return [check.name.split(" (")[0] for check in report.checks() if not check.passed]


def test_a_stale_eval_fold_fails(digit_data):
    """The planted bug: the fused residual block evaluates with the weights it had before training (a fold cached
    once and never refreshed). Training steps agree; the evaluation outputs do not."""
    fused, stock = _pair()
    block = fused[6]
    block.__dict__["frozen"] = copy.deepcopy(block).eval()  # not a submodule: no state_dict key
    _plant(block, lambda self, x: type(self).forward(self, x) if self.training else self.frozen(x))
    failed = _failed_checks(_verify((fused, stock), _loaders(digit_data)))
    assert failed[0].startswith("eval outputs at step 4") and "loss" not in failed and "updates" not in failed


def test_a_wrong_batch_norm_momentum_fails(digit_data):
    """The planted bug: the fused BatchNorm updates its running statistics with momentum 0.2 where stock has 0.1."""
    fused, stock = _pair()
    fused[4].momentum = 0.2
    assert stock[4].momentum == 0.1
    assert _failed_checks(_verify((fused, stock), _loaders(digit_data))) == ["buffers", "routed: buffers"]


@pytest.mark.stock_routes
def test_fused_side_runs_fastcnn_kernels_and_routed_side_the_routes(digit_data, monkeypatch):
    """On CPU in float32 the residual block's route runs its stock layers: the routed side takes that route (as a
    user's model does), the fused side runs the block's fused path; both are judged and timed."""
    fused, stock = _pair()
    ran_fused = []
    fused_forward = residual._ResidualBlock._fused_forward

    def recorded(self, *args):
        ran_fused.append(self)
        return fused_forward(self, *args)

    monkeypatch.setattr(residual._ResidualBlock, "_fused_forward", recorded)
    report = _verify((fused, stock), _loaders(digit_data), steps=2)
    assert report.passed, report.format()
    assert ran_fused and all(block is fused[6] for block in ran_fused)  # never the routed copy's block
    assert report.seconds["routed"] > 0 and "fastcnn as your model runs (routes on)" in report.format()


def test_a_dropped_bias_fails(digit_data):
    """The planted bug: the fused conv+ReLU+pool ignores its bias."""
    fused, stock = _pair()
    _plant(fused[0], lambda self, x: fastcnn.functional.conv2d_relu_pool(x, self.weight, None, self.stride,
                                                                         self.padding))
    failed = _failed_checks(_verify((fused, stock), _loaders(digit_data)))
    assert {"loss", "updates", "eval outputs at step 4", "eval outputs at step 8"} <= set(failed)


def test_checks_take_max_or_median_over_steps():
    """One step whose update differs (a ReLU flip) passes the median rule; a loss difference in one step fails."""
    flip = [0.0, 0.3, 0.0]
    steps = {"loss": {"fused": [0.0, 0.02, 0.5], "control": [0.01, 0.0, 0.0]},
             "buffers": {"fused": [0.0] * 3, "control": [0.0] * 3}, "updates": {"fused": flip, "control": [0.0] * 3}}
    report = ParityReport(torch.bfloat16, 3, steps, [], {"fused": 1.0, "stock": 1.0}, 8, {"fused": 0, "stock": 0})
    loss, buffers, updates = report.checks()
    assert loss.bound == pytest.approx(0.02 + PARITY_FLOOR[torch.bfloat16]) and not loss.passed
    assert buffers.passed and updates.passed and updates.fused == 0.0 and not report.passed
    assert ParityReport(torch.bfloat16, 1, steps, [], {}, 8, {}).passed  # a window of one step judges step 1 only


def test_progress_bars_only_when_asked(digit_data, capsys):
    loaders = _loaders(digit_data)
    verify(_pair(), *loaders, max_steps=2, progress=False, **SGD)
    assert capsys.readouterr().err == ""
    verify(_pair(), *loaders, max_steps=2, progress=True, **SGD)
    assert "verify fused vs stock" in capsys.readouterr().err


def test_bad_arguments_are_named(digit_data):
    loader = _loaders(digit_data)[0]
    with pytest.raises(ValueError, match="optimizer"):
        verify(_pair(), loader, optimizer="rmsprop", lr=0.1)
    with pytest.raises(ValueError, match="precision"):
        verify(_pair(), loader, precision="fp8", lr=0.1)
    with pytest.raises(ValueError, match="window"):
        verify(_pair(), loader, window=0, lr=0.1)
    with pytest.raises(TypeError, match="model"):
        verify(42, loader, lr=0.1)
