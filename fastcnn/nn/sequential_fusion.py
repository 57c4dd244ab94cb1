"""Fusing ``Conv2d [-> BatchNorm2d] -> ReLU [-> pool]`` runs of a layer sequence into fastcnn's fused modules, slot
for slot.

Inside an ``nn.Sequential`` a layer's output feeds only the next layer, so a run ``Conv2d, ReLU, MaxPool2d`` computes
exactly ``ConvReLUPool2d`` and can be replaced by it. The fused module takes the conv's slot and ``FusedAway``
placeholders (identities that remember the layer they replace) take the ReLU's and the pool's, so the sequence keeps
its length and every later index (hence every state_dict key, e.g. torchvision's ``features.{i}.weight``) stays where
it was. The fused module shares the conv's Parameters.

A ``Conv2d, BatchNorm2d, ReLU[, pool]`` run (torchvision's ``_bn`` VGGs) becomes ``ConvBNReLU2d``/``ConvBNReLUPool2d``
at the conv's slot and a ``FusedBatchNorm2d`` at the BatchNorm's slot: the latter holds the BatchNorm's parameters
and buffers (keys ``{i+1}.weight``, ``{i+1}.running_mean``, ...) and passes its input through, since the fused conv
has applied it, in training mode with batch statistics as in eval mode (see ``fastcnn.nn.conv_bn``).

A run is fused only where that is exactly correct: the conv must be a plain ``nn.Conv2d``, followed directly by an
``nn.ReLU`` or by a plain ``nn.BatchNorm2d`` (of the conv's output channels) and then an ``nn.ReLU``; a following pool
joins the run when the fused modules support it (``nn.MaxPool2d``/``nn.AvgPool2d`` in floor mode, without padding,
dilation, indices or divisor override).

The sequence is a ``FusedSequential``, which runs a fused run slot by slot - every slot computing its stock layer,
the fused conv only its convolution - inside ``fastcnn.nn.unfused()`` (so hooks on any slot see the stock tensors)
and whenever the module in a ``FusedBatchNorm2d``'s slot is no longer the BatchNorm its conv was fused with: a
SyncBatchNorm conversion (``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` or fastcnn's) replaces the module in the
slot, and the model then normalises with that module, exactly as the stock model would.
"""
from collections import OrderedDict

import torch.nn as nn

from .conv import ConvReLU2d, ConvReLUPool2d, pool_module_options
from .conv_bn import ConvBNReLU2d, ConvBNReLUPool2d, fused_batch_norm_of
from .unfused import in_stock_slot, is_unfused, stock_slots


class FusedAway(nn.Identity):
    """The placeholder in the slot of a layer (a ReLU or a pool) that the fused module before it computes: the
    identity, or that layer when its ``FusedSequential`` runs slot by slot. Holds no state (no state_dict keys).

    Args:
        layer: the stock module this slot held (kept, not registered as a child).
    """

    def __init__(self, layer):
        super().__init__()
        self.__dict__["layer"] = layer

    def forward(self, input):
        return self.layer(input) if in_stock_slot() else input

    def extra_repr(self):
        return f"fused away: {self.layer}"


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` of fused runs (see the module docstring): fused, or slot by slot inside
    ``fastcnn.nn.unfused()`` and when a fused conv's BatchNorm slot holds another module than the one it was fused
    with. Same children, names and state_dict keys as the stock Sequential."""

    def forward(self, input):
        if not (is_unfused() or self._batch_norm_replaced()):
            return super().forward(input)
        with stock_slots():
            return super().forward(input)

    def _batch_norm_replaced(self):
        """True when a fused conv's next slot no longer holds the FusedBatchNorm2d it applies (one pass, each call:
        the slots may be replaced at any time)."""
        expected = None  # the FusedBatchNorm2d the previous slot's fused conv applies
        for layer in self._modules.values():
            if expected is not None and layer is not expected:
                return True
            expected = fused_batch_norm_of(layer)
        return expected is not None


def _fusable_pool(module):
    """True when ``module`` is a pool the fused modules reproduce exactly."""
    if not isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        return False
    try:
        pool_module_options(module)
    except ValueError:  # padding, ceil_mode, dilation, indices or divisor_override: keep the stock pool
        return False
    return True


def _fused_run(layers, i):
    """The fused replacement of the run starting at ``layers[i]`` (a list of modules as long as the run), or None."""
    conv, rest = layers[i], layers[i + 1:i + 4]
    if type(conv) is not nn.Conv2d or not rest:
        return None
    has_norm = type(rest[0]) is nn.BatchNorm2d and rest[0].num_features == conv.out_channels
    norm, rest = (rest[0], rest[1:]) if has_norm else (None, rest)
    if not rest or not isinstance(rest[0], nn.ReLU):
        return None
    relu, pool = rest[0], rest[1] if len(rest) > 1 and _fusable_pool(rest[1]) else None
    if norm is None:
        block = ConvReLUPool2d.from_modules(conv, relu, pool) if pool is not None \
            else ConvReLU2d.from_modules(conv, relu)
        fused = [block.train(conv.training)]
    elif pool is not None:
        fused = list(ConvBNReLUPool2d.from_modules(conv, norm, relu, pool))  # [fused conv, held BatchNorm]
    else:
        fused = list(ConvBNReLU2d.from_modules(conv, norm, relu))
    return fused + [FusedAway(layer) for layer in (relu, pool) if layer is not None]  # the ReLU's and pool's slots


def fuse_layers(layers):
    """Returns a list of the same length as ``layers`` with every ``Conv2d, [BatchNorm2d,] ReLU[, pool]`` run fused.

    Args:
        layers: a sequence of modules applied one after another (e.g. the children of an ``nn.Sequential``).

    Example:
        >>> stock = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        >>> [type(m).__name__ for m in fuse_layers(stock)]
        ['ConvBNReLUPool2d', 'FusedBatchNorm2d', 'FusedAway', 'FusedAway']
    """
    layers = list(layers)
    fused = []
    while len(fused) < len(layers):
        run = _fused_run(layers, len(fused))
        fused += run if run is not None else [layers[len(fused)]]
    return fused


def fuse_sequential(sequential):
    """A new ``FusedSequential`` with ``sequential``'s runs fused (see ``fuse_layers``), the same child names (so the
    same state_dict keys), in the same training mode."""
    names = list(sequential._modules)
    return FusedSequential(OrderedDict(zip(names, fuse_layers(sequential)))).train(sequential.training)
