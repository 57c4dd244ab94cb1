"""Flat baselines: models that take an image batch ``(N, C, H, W)``, flatten it and classify the pixel vector.

They have no convolution, so there is nothing for fastcnn to fuse: ``fused`` is accepted (every zoo model takes it)
and both settings build the same model.
"""
import math

import torch.nn as nn

from ._registry import register_model


def _flat_features(in_shape):
    shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
    if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"fastcnn: in_shape must be a positive int or a tuple of them, e.g. (1, 28, 28); "
                         f"got {in_shape!r}")
    return math.prod(shape)


def _check_classes(num_classes):
    if not (isinstance(num_classes, int) and num_classes > 0):
        raise ValueError(f"fastcnn: num_classes must be a positive int, got {num_classes!r}")


@register_model
def logistic_regression(in_shape=(3, 32, 32), num_classes=10, *, fused=True):
    """Multinomial logistic regression on raw pixels: ``Flatten -> Linear``, returning logits (apply softmax or use
    ``nn.CrossEntropyLoss``).

    Args:
        in_shape: shape of one image, ``(C, H, W)`` (or any shape; it is flattened).
        num_classes: number of classes.
        fused: accepted for a uniform zoo interface; there is nothing to fuse.

    Shape:
        input ``(N, *in_shape)``; output ``(N, num_classes)``.

    Example:
        >>> model = fastcnn.models.logistic_regression((1, 8, 8), num_classes=10)
        >>> model(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """
    _check_classes(num_classes)
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat_features(in_shape), num_classes))


@register_model
def mlp(in_shape=(3, 32, 32), num_classes=10, hidden_sizes=(256, 128), dropout=0.0, *, fused=True):
    """A multilayer perceptron on raw pixels: ``Flatten``, then ``Linear -> ReLU [-> Dropout]`` per hidden size, then
    a ``Linear`` to logits.

    Args:
        in_shape: shape of one image, ``(C, H, W)``.
        num_classes: number of classes.
        hidden_sizes: widths of the hidden layers, in order (empty: logistic regression).
        dropout: dropout probability after each hidden ReLU (0 adds no Dropout layer).
        fused: accepted for a uniform zoo interface; there is nothing to fuse.

    Shape:
        input ``(N, *in_shape)``; output ``(N, num_classes)``.

    Example:
        >>> model = fastcnn.models.mlp((1, 8, 8), num_classes=10, hidden_sizes=(64,))
        >>> model(torch.randn(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """
    _check_classes(num_classes)
    if not 0 <= dropout < 1:
        raise ValueError(f"fastcnn: dropout must be in [0, 1), got {dropout!r}")
    widths = [_flat_features(in_shape), *hidden_sizes]
    if not all(isinstance(w, int) and w > 0 for w in hidden_sizes):
        raise ValueError(f"fastcnn: hidden_sizes must be positive ints, got {hidden_sizes!r}")
    layers = [nn.Flatten()]
    for fan_in, fan_out in zip(widths, widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)
