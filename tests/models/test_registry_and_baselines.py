"""get_model / list_models, the flat baselines, and the errors of bad arguments."""
import pytest
import torch
import torch.nn as nn

from fastcnn import models


def test_list_models_names_every_factory():
    names = models.list_models()
    assert names == sorted(names)
    expected = {"vgg", "logistic_regression", "mlp"} | {f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")}
    expected |= {f"resnet{d}" for d in (18, 34, 50, 101, 152)}
    assert expected <= set(names)


def test_get_model_builds_with_arguments():
    model = models.get_model("VGG11", num_classes=4, width=0.125, fused=False)
    assert model.classifier[-1].out_features == 4
    assert type(model.features[0]) is nn.Conv2d


def test_unknown_model_lists_the_names():
    with pytest.raises(ValueError, match="unknown model 'alexnet'; available models: .*resnet18.*vgg11"):
        models.get_model("alexnet")


def test_weights_are_refused_with_a_pointer_to_load_state_dict():
    for name in ("vgg11", "resnet18"):
        with pytest.raises(ValueError, match="load_state_dict"):
            models.get_model(name, weights="DEFAULT")


@pytest.mark.parametrize("fused", [True, False])
def test_logistic_regression_is_flatten_linear(fused):
    model = models.logistic_regression((1, 8, 8), num_classes=10, fused=fused)
    x = torch.randn(5, 1, 8, 8)
    linear = model[1]
    torch.testing.assert_close(model(x), x.flatten(1) @ linear.weight.T + linear.bias)
    assert sum(p.numel() for p in model.parameters()) == 64 * 10 + 10


@pytest.mark.parametrize("hidden_sizes, dropout", [((32, 16), 0.0), ((7,), 0.5), ((), 0.0)])
def test_mlp_layers_and_output(hidden_sizes, dropout):
    model = models.mlp((3, 5, 5), num_classes=4, hidden_sizes=hidden_sizes, dropout=dropout)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    widths = [75, *hidden_sizes, 4]
    assert [(m.in_features, m.out_features) for m in linears] == list(zip(widths, widths[1:]))
    assert sum(isinstance(m, nn.Dropout) for m in model) == (len(hidden_sizes) if dropout else 0)
    model.eval()
    x = torch.randn(3, 3, 5, 5)
    expected = x.flatten(1)
    for layer in linears[:-1]:
        expected = torch.relu(layer(expected))
    torch.testing.assert_close(model(x), linears[-1](expected))


@pytest.mark.parametrize("factory, kwargs, match", [
    (models.logistic_regression, {"in_shape": (1, 0, 8)}, "in_shape must be"),
    (models.logistic_regression, {"num_classes": 0}, "num_classes must be"),
    (models.mlp, {"hidden_sizes": (16, -1)}, "hidden_sizes must be"),
    (models.mlp, {"dropout": 1.0}, "dropout must be"),
])
def test_bad_baseline_arguments_are_named(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)
