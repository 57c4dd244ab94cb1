"""``fastcnn.convert(model)``: a fused copy of a stock model, with the same state_dict and the same outputs.

These patterns are replaced, wherever they occur in the module tree:

* ``Conv2d [-> BatchNorm2d] -> ReLU [-> MaxPool2d/AvgPool2d]`` runs inside an ``nn.Sequential`` (torchvision's VGG
  ``features``, ``_bn`` variants included, timm's VGG ``features`` and ResNet-D deep stems, or any user Sequential)
  become ``ConvReLU2d``/``ConvReLUPool2d`` (or ``ConvBNReLU2d``/``ConvBNReLUPool2d`` with a ``FusedBatchNorm2d``
  holding the BatchNorm's state in its slot) at the conv's index, with placeholders in the freed slots, so indices
  and keys do not move (see ``fastcnn.nn.sequential_fusion``). Only Sequential containers are scanned: there the
  data flow is known to be layer after layer; a custom ``forward`` could use its modules in any order.
* ResNet residual blocks become ``fastcnn.nn.BasicBlock`` / ``Bottleneck`` with ``fused=True``, holding the same
  tensors: torchvision-style blocks (a class named ``BasicBlock`` or ``Bottleneck`` with exactly torchvision's
  children) and timm's (``timm.models.resnet``), those without attention, anti-aliasing, DropBlock or stochastic
  depth (see ``fastcnn._convert_blocks``).
* torchvision GoogLeNet ``Inception`` blocks whose branches are exactly those ``fastcnn.nn.InceptionBlock`` builds
  become ``InceptionBlock`` with ``fused=True``, holding the same tensors.

A block is replaced only when the fastcnn block computes exactly what it computes; what was fused and what was left,
and why, is in the report (``convert(model, report=True)``) and summarised in one INFO line of the ``"fastcnn"``
logger. The input model is not modified (the result is built from a deep copy) and no class of another library is
patched. Forward/backward hooks registered on replaced modules are not carried over.
"""
import copy

import torch.nn as nn

from ._convert_blocks import Unfusable, inception_block, timm_residual_block, torchvision_residual_block
from ._convert_report import ConversionReport, join
from .nn.sequential_fusion import fuse_sequential

_BLOCK_REPLACEMENTS = (timm_residual_block, torchvision_residual_block, inception_block)


def convert(model, report=False):
    """Returns a new model in which stock Conv/BatchNorm/ReLU/pool runs and residual and Inception blocks are
    replaced by fastcnn's fused modules; ``state_dict()`` keys, shapes and values and the outputs are those of
    ``model``. Logs a one-line summary at INFO on the ``"fastcnn"`` logger.

    Args:
        model: an ``nn.Module``, e.g. ``torchvision.models.vgg16()``, ``resnet50()`` or
            ``timm.create_model("resnet50")``.
        report: also return a ``ConversionReport``: one entry per fused module and per block or ``nn.Conv2d``
            left stock, with the reason (``print(report)`` lists them).

    Returns:
        the converted model, or ``(model, report)`` when ``report=True``.

    Example:
        >>> stock = torchvision.models.vgg11(num_classes=10)
        >>> fused, report = fastcnn.convert(stock, report=True)
        >>> type(fused.features[0]).__name__
        'ConvReLUPool2d'
        >>> report.summary()
        'fastcnn.convert(VGG): fused 8 (5 ConvReLUPool2d, 3 ConvReLU2d); left 0'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastcnn.convert: model must be an nn.Module, got {type(model).__name__}")
    entries = ConversionReport(type(model).__name__)
    converted = _convert(copy.deepcopy(model), "", entries)
    entries.finish(converted)
    return (converted, entries) if report else converted


def _convert(module, name, report):
    """The fused replacement of ``module`` (its children converted first, in place: ``module`` is our copy), named
    ``name`` in the model; what was done goes to ``report``."""
    try:
        for replacement in _BLOCK_REPLACEMENTS:
            block = replacement(module)
            if block is not None:
                report.add_block(name, module, block)
                return block
    except Unfusable as reason:  # left stock; its children may still hold Sequential runs
        report.add_left_block(name, module, str(reason))
    for child_name, child in module.named_children():
        setattr(module, child_name, _convert(child, join(name, child_name), report))
    if type(module) is nn.Sequential:  # a subclass may have its own forward
        fused = fuse_sequential(module)
        report.add_sequential(name, module, fused)
        return fused
    return module
