"""The report of ``fastcnn.convert``: which modules became fused modules, and which convolutions and blocks were left
stock and why."""
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from .nn.conv import ConvReLU2d, ConvReLUPool2d
from .nn.conv_bn import ConvBNReLU2d, ConvBNReLUPool2d

logger = logging.getLogger("fastcnn")

_FUSED_CONVS = (ConvReLU2d, ConvReLUPool2d, ConvBNReLU2d, ConvBNReLUPool2d)  # each is also an nn.Conv2d


@dataclass(frozen=True)
class ConversionEntry:
    """One module that ``fastcnn.convert`` replaced or left.

    Args:
        name: the module's name in the model, as ``named_modules()`` gives it (``""`` for the model itself).
        source: what was there: a class (``"Conv2d"``, ``"timm.models.resnet.BasicBlock"``) or, for a fused
            run of a Sequential, its layers (``"Conv2d, ReLU, MaxPool2d"``).
        result: the fastcnn class that replaced it, or None if it was left.
        reason: why it was left; for a fused entry, an optional note.

    Example:
        >>> str(ConversionEntry("features.0", "Conv2d, ReLU", "ConvReLU2d", None))
        'fused  features.0: Conv2d, ReLU -> fastcnn.nn.ConvReLU2d'
    """

    name: str
    source: str
    result: Optional[str] = None
    reason: Optional[str] = None

    @property
    def fused(self):
        return self.result is not None

    def __str__(self):
        where = self.name or "(model)"
        if not self.fused:
            return f"left   {where}: {self.source}: {self.reason}"
        note = f" ({self.reason})" if self.reason else ""
        return f"fused  {where}: {self.source} -> fastcnn.nn.{self.result}{note}"


class ConversionReport(list):
    """What ``fastcnn.convert(model, report=True)`` did: a list of ``ConversionEntry``, in the model's module order,
    one per fused replacement (a block, or a Sequential run at its conv's slot) and one per block or ``nn.Conv2d``
    left stock, with the reason. Convs inside a replaced or left block are covered by the block's entry.

    Args:
        model_name: the converted model's class name, for the summary.

    Example:
        >>> model, report = fastcnn.convert(torchvision.models.resnet18(), report=True)
        >>> report.summary()
        'fastcnn.convert(ResNet): fused 8 (8 BasicBlock); left 1 (1 Conv2d)'
        >>> report.left[0].name  # the stem conv: ResNet.forward applies it, not a Sequential
        'conv1'
    """

    def __init__(self, model_name):
        super().__init__()
        self.model_name = model_name
        self._left_blocks = []  # names: the convs inside a left block are covered by its entry

    @property
    def fused(self):
        return [entry for entry in self if entry.fused]

    @property
    def left(self):
        return [entry for entry in self if not entry.fused]

    def summary(self):
        """One line: how many modules were fused and left, by class."""
        def counts(kinds):
            counter = Counter(kinds)
            return f"{sum(counter.values())}" + (f" ({', '.join(f'{n} {k}' for k, n in counter.items())})"
                                                 if counter else "")
        return (f"fastcnn.convert({self.model_name}): fused {counts(e.result for e in self.fused)}; "
                f"left {counts(e.source.rsplit('.', 1)[-1] for e in self.left)}")

    def __str__(self):
        return "\n".join([self.summary(), *map(str, self)])

    # What convert() calls while it converts (module names are qualified: "layer1.0").

    def add_block(self, name, module, block):
        self.append(ConversionEntry(name, class_name(module), type(block).__name__))

    def add_left_block(self, name, module, reason):
        self.append(ConversionEntry(name, class_name(module), None, reason))
        self._left_blocks.append(name)

    def add_sequential(self, name, sequential, fused):
        """Entries for the scanned ``nn.Sequential`` ``sequential`` and ``fused``, its fused copy (same length and
        child names): one per fused run, at its conv's name, and one per conv that starts no run."""
        names, layers, fused = list(sequential._modules), list(sequential), list(fused)
        for i, (before, after) in enumerate(zip(layers, fused)):
            where = join(name, names[i])
            if isinstance(after, _FUSED_CONVS):
                end = i + 1  # the run's other slots hold new modules: placeholders and the BatchNorm's holder
                while end < len(fused) and fused[end] is not layers[end] and not isinstance(fused[end], _FUSED_CONVS):
                    end += 1
                note = _pool_left_note(layers[end] if end < len(layers) else None, layers[end - 1])
                self.append(ConversionEntry(where, ", ".join(class_name(m) for m in layers[i:end]),
                                            type(after).__name__, note))
            elif isinstance(before, nn.Conv2d) and after is before and not _within(where, self._left_blocks):
                self.append(ConversionEntry(where, class_name(before), None, _why_run_not_fused(layers, i)))

    def finish(self, model):
        """Adds the convs left outside any scanned Sequential or reported block, sorts the entries in ``model``'s
        module order and logs the summary."""
        order = {name: i for i, name in enumerate(dict(model.named_modules()))}
        covered = [entry.name for entry in self]
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and not isinstance(module, _FUSED_CONVS) \
                    and not _within(name, covered):
                self.append(ConversionEntry(name, class_name(module), None, _why_outside_sequential(model, name)))
        self.sort(key=lambda entry: order.get(entry.name, len(order)))
        logger.info(self.summary())
        return self


def join(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _within(name, modules):
    """True when ``name`` is one of ``modules`` or inside one of them."""
    return any(name == m or not m or name.startswith(m + ".") for m in modules)


def class_name(module):
    """``Conv2d`` for torch.nn's classes, ``timm.models.resnet.BasicBlock`` for others."""
    cls = type(module)
    return cls.__name__ if cls.__module__.startswith("torch.nn.") else f"{cls.__module__}.{cls.__qualname__}"


def _pool_left_note(following, last):
    """A note on a fused run ending in its ReLU that is followed by a pool the fused modules do not reproduce."""
    if isinstance(last, nn.ReLU) and isinstance(following, (nn.MaxPool2d, nn.AvgPool2d)):
        return (f"the {class_name(following)} after it stays a separate layer: only floor-mode pools without padding, "
                "dilation, indices or divisor_override are fused")
    return None


def _why_run_not_fused(layers, i):
    """Why the conv at ``layers[i]`` of a scanned Sequential starts no fused run (which is
    ``Conv2d[, BatchNorm2d], ReLU[, pool]``, see ``fastcnn.nn.sequential_fusion``)."""
    conv, rest = layers[i], layers[i + 1:i + 3]
    if type(conv) is not nn.Conv2d:
        return "a Conv2d subclass, whose forward may differ: only plain nn.Conv2d is fused"
    path = ""
    if rest and type(rest[0]) is nn.BatchNorm2d and rest[0].num_features == conv.out_channels:
        path, rest = "BatchNorm2d then ", rest[1:]
    if not rest:
        return f"{'followed by BatchNorm2d, ' if path else ''}the last layer of its Sequential: no ReLU to fuse with"
    return f"followed by {path}{class_name(rest[0])}, not ReLU (fused runs are Conv2d[, BatchNorm2d], ReLU[, pool])"


def _why_outside_sequential(model, name):
    """Why a conv that is no child of a scanned Sequential was left."""
    if not name:
        return "the model is a bare convolution: nothing follows it to fuse with"
    parent = model.get_submodule(name.rpartition(".")[0])
    if isinstance(parent, nn.Sequential):
        return (f"in {class_name(parent)}, an nn.Sequential subclass whose forward may differ: only plain "
                "nn.Sequential runs are fused")
    return (f"in {class_name(parent)}, whose own forward() decides what follows it: fastcnn fuses runs of plain "
            "nn.Sequential containers and known residual/Inception blocks")
