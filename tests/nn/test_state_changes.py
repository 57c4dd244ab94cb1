"""Fused eval equals stock eval after every ordinary way a user changes a model's state.

Each case evaluates the fused model once (so anything it might derive and keep is made), changes its state the way
a user would, then compares its eval output with a stock model loaded from the fused model's own state_dict at
that moment, against a float64 oracle (the same stock model in float64). A fused model that kept derived state
(e.g. BatchNorm folded into cached weights) would answer for its old state here.
"""
import copy

import pytest
import torch
import torch.nn as nn
from torchvision.models.googlenet import Inception

import fastcnn
from fastcnn.models import get_model

from _tolerances import assert_close_to_oracle


def _zoo_pair(name, **kwargs):
    torch.manual_seed(0)
    fused = get_model(name, fused=True, num_classes=10, **kwargs)
    stock = get_model(name, fused=False, num_classes=10, **kwargs)
    return fused, stock, torch.randn(2, 3, 64, 64)


def _inception_pair():
    torch.manual_seed(0)
    stock = Inception(24, 8, 6, 10, 4, 6, 6)
    fused = fastcnn.nn.InceptionBlock(24, 8, 6, 10, 4, 6, 6)
    fused.load_state_dict(stock.state_dict())
    return fused, stock, torch.randn(2, 24, 9, 11)


PAIRS = {
    "resnet18": lambda: _zoo_pair("resnet18", width=0.25),
    "resnet50": lambda: _zoo_pair("resnet50", width=0.25),
    "vgg11_bn": lambda: _zoo_pair("vgg11_bn", width=0.25, hidden_features=32),
    "inception": _inception_pair,
}


def _loss(model, x):
    out = model(x)
    return (out.float() ** 2).mean()


def _train_steps(optimizer_class, **options):
    def change(model, x):
        model.train()
        optimizer = optimizer_class(model.parameters(), **options)
        for _ in range(2):
            optimizer.zero_grad()
            _loss(model, x).backward()
            optimizer.step()
    return change


def _running_statistics_update(model, x):
    model.train()
    with torch.no_grad():
        model(x)


def _load_other_state(model, x):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for t in other.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
    model.load_state_dict(other.state_dict())


def _in_place_edit(model, x):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9).add_(0.01)


def _data_edit(model, x):
    for p in model.parameters():
        p.data.mul_(0.9).add_(0.01)  # bypasses the version counter
    for name, b in model.named_buffers():
        if "running_var" in name:
            b.data.mul_(1.5)


def _copy_from_ema(model, x):
    ema = copy.deepcopy(model)
    _train_steps(torch.optim.SGD, lr=0.05)(ema, x)
    with torch.no_grad():
        for mine, averaged in zip(model.state_dict().values(), ema.state_dict().values()):
            mine.copy_(averaged)


def _to_float64(model, x):
    model.to(torch.float64)


CHANGES = {
    "torch.optim.SGD": _train_steps(torch.optim.SGD, lr=0.1, momentum=0.9),
    "fastcnn.optim.SGD": _train_steps(fastcnn.optim.SGD, lr=0.1, momentum=0.9),
    "fastcnn.optim.Adam": _train_steps(fastcnn.optim.Adam, lr=1e-2),
    "running-statistics": _running_statistics_update,
    "load_state_dict": _load_other_state,
    "in-place": _in_place_edit,
    "data-edit": _data_edit,
    "copy-from-ema": _copy_from_ema,
    "to-float64": _to_float64,
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("pair", list(PAIRS))
def test_fused_eval_matches_stock_after_state_change(pair, change):
    fused, stock, x = PAIRS[pair]()
    stock.load_state_dict(fused.state_dict())
    with torch.no_grad():
        fused.eval()(x)  # anything a fused module derives from its state would be made now
    CHANGES[change](fused, x)
    dtype = next(fused.parameters()).dtype
    stock = stock.to(dtype)
    stock.load_state_dict(fused.state_dict())
    fused.eval(), stock.eval()
    x = x.to(dtype)
    with torch.no_grad():
        ours, theirs = fused(x), stock(x)
        oracle = copy.deepcopy(stock).double()(x.double())
    assert_close_to_oracle(ours, theirs, oracle, f"{pair} after {change}")


@pytest.mark.parametrize("pair", ["resnet18", "vgg11_bn", "inception"])
def test_unfused_context_computes_the_stock_model(pair):
    fused, stock, x = PAIRS[pair]()
    stock.load_state_dict(fused.state_dict())
    for train in (False, True):
        fused.train(train), stock.train(train)
        torch.manual_seed(1)
        with fastcnn.nn.unfused():
            ours = fused(x)
        torch.manual_seed(1)
        theirs = stock(x)
        assert torch.equal(ours, theirs), f"{pair} train={train}"
    for name, buffer in stock.named_buffers():
        assert torch.equal(fused.get_buffer(name), buffer), name


def test_unfused_context_fires_hooks_on_every_stock_layer():
    fused, stock, x = PAIRS["vgg11_bn"]()
    stock.load_state_dict(fused.state_dict())
    fused.eval(), stock.eval()
    seen = {}

    def record(model, key):
        for name, module in model.features.named_children():
            module.register_forward_hook(lambda m, i, o, name=name: seen.setdefault(key, {}).update({name: o.clone()}))

    record(fused, "fused")
    record(stock, "stock")
    with torch.no_grad(), fastcnn.nn.unfused():
        fused(x)
    with torch.no_grad():
        stock(x)
    assert seen["fused"].keys() == seen["stock"].keys()
    for name, out in seen["stock"].items():
        assert torch.equal(seen["fused"][name], out), f"features.{name}"


def test_a_standalone_fused_module_keeps_its_output_when_unfused():
    layer = fastcnn.nn.ConvReLUPool2d(3, 4, 3).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        fused = layer(x)
        with fastcnn.nn.unfused():
            assert torch.equal(layer(x), fused)  # no neighbours in a FusedSequential to finish the run: stays fused


def test_fused_sequential_state_dict_is_the_stock_one():
    fused, stock, _ = PAIRS["vgg11_bn"]()
    assert isinstance(fused.features, fastcnn.nn.FusedSequential)
    assert isinstance(fused.features, nn.Sequential)
    assert list(fused.state_dict()) == list(stock.state_dict())
    stock.load_state_dict(fused.state_dict(), strict=True)
    fused.load_state_dict(stock.state_dict(), strict=True)
