"""fastcnn.convert: torchvision and user models become fused models with the same state_dict and outputs; the
input model and the global RNG are left untouched."""
import copy

import pytest
import torch
import torch.nn as nn

import fastcnn
from fastcnn.nn import BasicBlock, Bottleneck, ConvBNReLUPool2d, ConvReLU2d, ConvReLUPool2d

from _parity import (assert_step_parity, parity_input_shape, seeded_torchvision_state, torchvision_for_parity,
                     torchvision_model, with_state)


def _assert_same_state(converted, stock):
    assert list(converted.state_dict()) == list(stock.state_dict())
    for key, value in stock.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


# Training-mode inputs that give every BatchNorm >= 16 values per channel (see _parity). ResNet-50 in training mode
# runs in float64: in float32 it is too ill-conditioned to compare (see test_bottleneck_net_training_parity_float64).
@pytest.mark.parametrize("name, batch, size, fused_type, dtype", [
    (name, *parity_input_shape(name, train=True), fused_type, dtype) for name, fused_type, dtype in [
        ("vgg11", ConvReLUPool2d, torch.float32), ("vgg11_bn", ConvBNReLUPool2d, torch.float32),
        ("resnet18", BasicBlock, torch.float32), ("resnet50", Bottleneck, torch.float64)]
])
def test_convert_torchvision_models(name, batch, size, fused_type, dtype):
    state = seeded_torchvision_state(name, num_classes=5)
    stock, oracle = (with_state(lambda: torchvision_for_parity(name, num_classes=5), state, d)
                     for d in (dtype, torch.float64))
    converted = fastcnn.convert(stock)
    _assert_same_state(converted, stock)
    replaced = [m for m in converted.modules() if isinstance(m, fused_type)]
    assert replaced and all(getattr(m, "fused", True) for m in replaced)
    assert not any(isinstance(m, fused_type) for m in stock.modules())  # the input model is not modified
    assert_step_parity(converted, stock, oracle, torch.randn(batch, 3, size, size), train=True)


def test_user_sequential_runs_and_unfusable_pools():
    stock = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # fused into one ConvReLUPool2d
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 1, padding=1),  # padded pool: ConvReLU2d only
        nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),  # BatchNorm in between: ConvBNReLU2d + the BN's state
        nn.Conv2d(8, 4, 1), nn.ReLU(), nn.AvgPool2d(2),
    )
    converted = fastcnn.convert(stock)
    assert [type(m).__name__ for m in converted] == [
        "ConvReLUPool2d", "FusedAway", "FusedAway", "ConvReLU2d", "FusedAway", "MaxPool2d",
        "ConvBNReLU2d", "FusedBatchNorm2d", "FusedAway", "ConvReLUPool2d", "FusedAway", "FusedAway"]
    assert converted[9].pool == "avg"
    _assert_same_state(converted, stock)
    assert_step_parity(converted, stock, copy.deepcopy(stock).double(), torch.randn(2, 3, 13, 17), train=True)


def test_nested_and_named_containers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), nn.Flatten())
            self.head = nn.Sequential(nn.Linear(4 * 5 * 5, 2))

        def forward(self, x):
            return self.head(self.body(x))

    stock = Net()
    converted = fastcnn.convert(stock)
    assert isinstance(converted.body[0][0], ConvReLU2d) and isinstance(converted, Net)
    _assert_same_state(converted, stock)
    x = torch.randn(2, 3, 7, 7)
    assert_step_parity(converted, stock, copy.deepcopy(stock).double(), x, train=False)


def test_sequential_subclasses_and_bare_modules_are_left_alone():
    class Reordered(nn.Sequential):
        def forward(self, x):  # applies its layers in reverse: no run here is a Conv -> ReLU chain
            for layer in reversed(self):
                x = layer(x)
            return x

    stock = nn.ModuleDict({"a": Reordered(nn.ReLU(), nn.Conv2d(3, 3, 1)), "b": nn.Conv2d(3, 3, 1)})
    converted = fastcnn.convert(stock)
    assert type(converted["a"][1]) is nn.Conv2d and type(converted["b"]) is nn.Conv2d


def test_frozen_parameters_and_training_mode_carry_over():
    stock = torchvision_model("resnet18", num_classes=3).eval()
    for parameter in stock.layer1.parameters():
        parameter.requires_grad_(False)
    converted = fastcnn.convert(stock)
    assert not converted.training and not converted.layer1[0].training
    assert [p.requires_grad for p in converted.parameters()] == [p.requires_grad for p in stock.parameters()]


def test_convert_does_not_consume_the_global_rng():
    stock = torchvision_model("resnet18", num_classes=3)
    state = torch.get_rng_state()
    fastcnn.convert(stock)
    assert torch.equal(torch.get_rng_state(), state)


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        fastcnn.convert(torch.randn(3))
