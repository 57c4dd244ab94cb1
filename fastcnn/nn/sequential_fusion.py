"""Fusing ``Conv2d -> ReLU [-> pool]`` runs of a layer sequence into fastcnn's fused modules, slot for slot.

Inside an ``nn.Sequential`` a layer's output feeds only the next layer, so a run ``Conv2d, ReLU, MaxPool2d`` computes
exactly ``ConvReLUPool2d`` and can be replaced by it. The fused module takes the conv's slot and ``nn.Identity``
placeholders take the ReLU's and the pool's, so the sequence keeps its length and every later index (hence every
state_dict key, e.g. torchvision's ``features.{i}.weight``) stays where it was. The fused module shares the conv's
Parameters.

A run is fused only where that is exactly correct: the conv must be a plain ``nn.Conv2d`` directly followed by an
``nn.ReLU``; a following pool joins the run when ``ConvReLUPool2d`` supports it (floor mode, no padding, dilation
or indices). ``Conv2d -> BatchNorm2d -> ReLU`` is left alone: in training mode BatchNorm normalises with the batch's
statistics, which no fused conv here computes.
"""
from collections import OrderedDict

import torch.nn as nn

from .conv import ConvReLU2d, ConvReLUPool2d


def _is_fusable_conv(module):
    return type(module) is nn.Conv2d


def _try_fuse_pool(conv, relu, pool):
    """The ConvReLUPool2d for (conv, relu, pool), or None when that pool has options the fused op does not have."""
    if not isinstance(pool, (nn.MaxPool2d, nn.AvgPool2d)):
        return None
    try:
        return ConvReLUPool2d.from_modules(conv, relu, pool)
    except ValueError:  # padding, ceil_mode, dilation, indices or divisor_override: keep the stock pool
        return None


def fuse_layers(layers):
    """Returns a list of the same length as ``layers`` with every ``Conv2d, ReLU[, pool]`` run fused.

    Args:
        layers: a sequence of modules applied one after another (e.g. the children of an ``nn.Sequential``).

    Example:
        >>> stock = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        >>> [type(m).__name__ for m in fuse_layers(stock)]
        ['ConvReLUPool2d', 'Identity', 'Identity']
    """
    layers = list(layers)
    fused = []
    i = 0
    while i < len(layers):
        conv = layers[i]
        relu = layers[i + 1] if i + 1 < len(layers) else None
        if not (_is_fusable_conv(conv) and isinstance(relu, nn.ReLU)):
            fused.append(conv)
            i += 1
            continue
        block = _try_fuse_pool(conv, relu, layers[i + 2]) if i + 2 < len(layers) else None
        run_length = 3 if block is not None else 2
        if block is None:
            block = ConvReLU2d.from_modules(conv, relu)
        block.train(conv.training)
        fused += [block] + [nn.Identity() for _ in range(run_length - 1)]
        i += run_length
    return fused


def fuse_sequential(sequential):
    """A new ``nn.Sequential`` with ``sequential``'s runs fused (see ``fuse_layers``), the same child names (so the
    same state_dict keys), in the same training mode."""
    names = list(sequential._modules)
    return nn.Sequential(OrderedDict(zip(names, fuse_layers(sequential)))).train(sequential.training)
