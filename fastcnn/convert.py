"""``fastcnn.convert(model)``: a fused copy of a stock model, with the same state_dict and the same outputs.

Two patterns are replaced, wherever they occur in the module tree:

* ``Conv2d [-> BatchNorm2d] -> ReLU [-> MaxPool2d/AvgPool2d]`` runs inside an ``nn.Sequential`` (torchvision's VGG
  ``features``, ``_bn`` variants included, or any user Sequential) become ``ConvReLU2d``/``ConvReLUPool2d`` (or
  ``ConvBNReLU2d``/``ConvBNReLUPool2d`` with a ``FusedBatchNorm2d`` holding the BatchNorm's state in its slot) at the
  conv's index, with ``nn.Identity`` in the freed slots, so indices and keys do not move (see
  ``fastcnn.nn.sequential_fusion``). Only Sequential containers are scanned: there the data flow is known to be
  layer after layer; a custom ``forward`` could use its modules in any order.
* torchvision-style residual blocks (a class named ``BasicBlock`` or ``Bottleneck`` with torchvision's attributes
  ``conv1, bn1, conv2, bn2[, conv3, bn3], relu, downsample`` and BatchNorm2d norms) become ``fastcnn.nn.BasicBlock``
  / ``Bottleneck`` with ``fused=True``, holding the same tensors.
* torchvision GoogLeNet ``Inception`` blocks (a class named ``Inception`` whose branches are exactly those
  ``fastcnn.nn.InceptionBlock`` builds) become ``InceptionBlock`` with ``fused=True``, holding the same tensors.

The input model is not modified (the result is built from a deep copy) and no class of another library is patched.
Forward/backward hooks registered on replaced modules are not carried over.
"""
import copy

import torch
import torch.nn as nn

from .nn.inception import InceptionBlock
from .nn.residual import BasicBlock, Bottleneck
from .nn.sequential_fusion import fuse_sequential


def convert(model):
    """Returns a new model in which stock Conv/BatchNorm/ReLU/pool runs and residual blocks are replaced by fastcnn's
    fused modules; ``state_dict()`` keys, shapes and values and the outputs are those of ``model``.

    Args:
        model: an ``nn.Module``, e.g. ``torchvision.models.vgg16()`` or ``resnet50()``.

    Example:
        >>> stock = torchvision.models.vgg11(num_classes=10)
        >>> fused = fastcnn.convert(stock)
        >>> type(fused.features[0]).__name__
        'ConvReLUPool2d'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastcnn.convert: model must be an nn.Module, got {type(model).__name__}")
    return _convert(copy.deepcopy(model))


def _convert(module):
    """The fused replacement of ``module`` (its children converted first, in place: ``module`` is our copy)."""
    for replacement in (_fastcnn_residual_block, _fastcnn_inception_block):
        block = replacement(module)
        if block is not None:
            return block
    for name, child in module.named_children():
        setattr(module, name, _convert(child))
    if type(module) is nn.Sequential:  # a subclass may have its own forward
        return fuse_sequential(module)
    return module


def _block_arguments(module):
    """(fastcnn block class, constructor arguments) of a torchvision-style residual block, or None if ``module``
    is not one that fastcnn's blocks reproduce exactly."""
    kind = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}.get(type(module).__name__)
    convs = ("conv1", "conv2", "conv3") if kind is Bottleneck else ("conv1", "conv2")
    norms = tuple(name.replace("conv", "bn") for name in convs)
    if kind is None or not all(type(getattr(module, n, None)) is nn.Conv2d for n in convs) \
            or not all(type(getattr(module, n, None)) is nn.BatchNorm2d for n in norms) \
            or not isinstance(getattr(module, "relu", None), nn.ReLU) or not hasattr(module, "downsample"):
        return None
    conv1, conv2 = module.conv1, module.conv2
    if kind is BasicBlock:
        planes, strided, groups, base_width = conv1.out_channels, conv1, 1, 64
    else:
        planes, strided, groups = module.conv3.out_channels // Bottleneck.expansion, conv2, conv2.groups
        base_width = conv2.out_channels * 64 // (planes * groups)
        if int(planes * base_width / 64) * groups != conv2.out_channels:
            return None
    return kind, dict(inplanes=conv1.in_channels, planes=planes, stride=strided.stride[0], groups=groups,
                      base_width=base_width, dilation=conv2.dilation[0], norm_layer=_same_norm(module.bn1))


def _same_norm(norm):
    """A BatchNorm2d factory with ``norm``'s hyperparameters."""
    def factory(channels):
        return nn.BatchNorm2d(channels, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                              track_running_stats=norm.track_running_stats)
    return factory


def _fastcnn_residual_block(module):
    """A fused fastcnn block holding ``module``'s tensors, or None if ``module`` is not a residual block we take."""
    arguments = _block_arguments(module)
    if arguments is None:
        return None
    kind, kwargs = arguments
    downsample = module.downsample
    with torch.device("meta"):  # build without allocating or consuming the RNG; the tensors come from `module`
        block = kind(downsample=None, fused=True, **kwargs)
    block.downsample = downsample
    return _holding_state_of(block, module)


def _holding_state_of(block, module):
    """``block`` (built on the meta device) given ``module``'s tensors, requires_grad flags and training mode."""
    requires_grad = {name: p.requires_grad for name, p in module.named_parameters()}
    block.load_state_dict(module.state_dict(), strict=True, assign=True)
    for name, parameter in block.named_parameters():
        parameter.requires_grad_(requires_grad[name])
    if any(t.is_meta for t in (*block.parameters(), *block.buffers())):
        raise RuntimeError(f"fastcnn.convert: {type(module).__name__} has state that its state_dict does not carry")
    return block.train(module.training)


_INCEPTION_BRANCHES = ("branch1", "branch2", "branch3", "branch4")


def _fastcnn_inception_block(module):
    """A fused InceptionBlock holding a torchvision-style ``Inception`` block's tensors, or None if ``module`` is not
    one it reproduces exactly: the block built from ``module``'s channel counts must print the same branches (the
    reprs list every stage's class, kernel, padding, groups, BatchNorm eps/momentum and pooling)."""
    if type(module).__name__ != "Inception":
        return None
    try:
        first, second, third, pool = (getattr(module, name) for name in _INCEPTION_BRANCHES)
        arguments = (first.conv.in_channels, first.conv.out_channels, second[0].conv.out_channels,
                     second[1].conv.out_channels, third[0].conv.out_channels, third[1].conv.out_channels,
                     pool[1].conv.out_channels)
        options = dict(branch3_kernel_size=third[1].conv.kernel_size[0], groups=third[1].conv.groups)
        with torch.device("meta"):
            block = InceptionBlock(*arguments, fused=True, **options)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    if any(repr(getattr(block, name)) != repr(getattr(module, name)) for name in _INCEPTION_BRANCHES):
        return None
    return _holding_state_of(block, module)
