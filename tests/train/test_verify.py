"""Parity verification: fused and stock in lockstep on the real digits reach >= 95% validation accuracy and pass;
a planted bug (a fused conv that drops its bias) fails the report."""
import pytest
import torch
import torch.nn as nn

import fastcnn
from fastcnn.data import digits, make_loader
from fastcnn.train.tolerances import PARITY_FLOOR
from fastcnn.train.verify import ParityReport, verify


def _pair(conv_class=fastcnn.nn.ConvReLUPool2d):
    stock = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Dropout(0.1), nn.Linear(16 * 4 * 4, 10))
    fused = nn.Sequential(conv_class(1, 16, 3, padding=1), nn.Identity(), nn.Identity(), nn.Flatten(),
                          nn.Dropout(0.1), nn.Linear(16 * 4 * 4, 10))
    return fused, stock


class BiaslessConvReLUPool2d(fastcnn.nn.ConvReLUPool2d):
    """The planted bug: a fused conv block that forgets its bias."""

    def forward(self, input):
        return fastcnn.functional.conv2d_relu_pool(input, self.weight, None, self.stride, self.padding)


@pytest.fixture(scope="module")
def digit_loaders():
    train, val = digits(image_size=8, channels=1)
    return make_loader(train, 64, shuffle=True), make_loader(val, 512)


def test_fused_and_stock_learn_the_digits_in_lockstep(digit_loaders):
    report = verify(_pair(), *digit_loaders, epochs=4, progress=False, lr=0.1, momentum=0.9)
    assert report.passed, report.format()
    assert report.val_accuracy["fused"] >= 0.95 and report.val_accuracy["stock"] >= 0.95, report.format()
    assert len(report.loss_differences) == 4 * 20 and report.images == 4 * 1280
    assert report.seconds["fused"] > 0 and report.seconds["stock"] > 0
    assert "PASS" in report.format()


def test_the_report_catches_a_planted_bug(digit_loaders):
    fused, stock = _pair(BiaslessConvReLUPool2d)
    with torch.no_grad():
        stock[0].bias.uniform_(0.05, 0.1)  # a bias that matters
    report = verify((fused, stock), digit_loaders[0], max_steps=20, progress=False, lr=0.05, momentum=0.9)
    assert not report.passed
    assert report.first_failing_step == 1 and "FAIL" in report.format()


def test_bound_follows_the_control_and_the_dtype_floor():
    report = ParityReport(torch.bfloat16, 3, [0.0, 0.02, 0.5], [0.01, 0.0, 0.0], (0.0, 0.0), 0.0, "w",
                          {"fused": 1.0, "stock": 1.0}, 8)
    assert report.bounds() == pytest.approx([0.02 + PARITY_FLOOR[torch.bfloat16]] * 3)
    assert report.first_failing_step == 3 and not report.passed


def test_bad_arguments_are_named(digit_loaders):
    with pytest.raises(ValueError, match="optimizer"):
        verify(_pair(), digit_loaders[0], optimizer="rmsprop", lr=0.1)
    with pytest.raises(ValueError, match="precision"):
        verify(_pair(), digit_loaders[0], precision="fp8", lr=0.1)
    with pytest.raises(TypeError, match="model"):
        verify(42, digit_loaders[0], lr=0.1)
