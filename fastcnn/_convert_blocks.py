"""The blocks ``fastcnn.convert`` replaces whole: ResNet residual blocks (torchvision's and timm's) and torchvision's
GoogLeNet ``Inception``, each by the fastcnn block that computes exactly what it computes, holding its tensors.

Every ``*_block(module)`` here returns the fused fastcnn block, or None when ``module`` is not a block of its kind,
or raises ``Unfusable`` (with the reason the conversion report shows) when ``module`` is one but fastcnn's block
would not compute exactly what it computes: something in it that the block does not have (attention, anti-aliasing,
DropBlock, stochastic depth, another activation or norm) or different convolution or BatchNorm settings. The last
check is done by building fastcnn's block from ``module``'s channel counts and comparing the ``repr`` of every conv
and norm (kernel, stride, padding, dilation, groups, bias, padding mode; eps, momentum, affine, running stats).

timm is optional: its blocks are recognised by class name and module (``timm.models.resnet``), never imported.
"""
import torch
import torch.nn as nn

from .nn.inception import InceptionBlock
from .nn.residual import BasicBlock, Bottleneck

_RESIDUAL_KINDS = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}
_TIMM_RESNET = "timm.models.resnet"


class Unfusable(Exception):
    """Raised by a block matcher for a block it recognises but cannot replace exactly; the message says why."""


def torchvision_residual_block(module):
    """``fastcnn.nn.BasicBlock``/``Bottleneck`` for a torchvision-style block: a class named ``BasicBlock`` or
    ``Bottleneck`` with exactly the children ``conv1, bn1, conv2, bn2[, conv3, bn3], relu[, downsample]``."""
    kind = _RESIDUAL_KINDS.get(type(module).__name__)
    if kind is None or type(module).__module__ == _TIMM_RESNET:
        return None
    _require_only_children(module, (*_stage_names(kind), "relu", "downsample"))
    if not isinstance(getattr(module, "relu", None), nn.ReLU):
        raise Unfusable("has no nn.ReLU named relu (torchvision's block layout)")
    if not hasattr(module, "downsample"):
        raise Unfusable("has no downsample attribute (torchvision's block layout)")
    return _residual_block(kind, module)


def timm_residual_block(module):
    """``fastcnn.nn.BasicBlock``/``Bottleneck`` for timm's ``timm.models.resnet.BasicBlock``/``Bottleneck`` (ResNet,
    ResNeXt, ResNet-D, wide ResNets), when it has nothing besides the convs and norms that fastcnn's block lacks:
    ``act1..`` plain ReLUs, ``drop_block`` and ``aa`` identities, no ``se`` attention, ``drop_path`` absent or with
    ``drop_prob=0``. The ``downsample`` module (conv + norm, or avg-pool + conv + norm for ResNet-D) is kept and
    run on the block input as timm runs it."""
    kind = _RESIDUAL_KINDS.get(type(module).__name__)
    if kind is None or type(module).__module__ != _TIMM_RESNET:
        return None
    stages = _stage_names(kind)
    activations = tuple(f"act{i}" for i in range(1, len(stages) // 2 + 1))
    _require_only_children(module, (*stages, *activations, "drop_block", "aa", "se", "drop_path", "downsample"))
    for name in activations:
        if type(getattr(module, name, None)) is not nn.ReLU:
            raise Unfusable(f"{name} is {type(getattr(module, name, None)).__name__}, not ReLU")
    for name, what in (("drop_block", "DropBlock: drops regions at random in training"),
                       ("aa", "anti-aliasing pool on the strided path"), ("se", "attention on the residual branch")):
        layer = getattr(module, name, None)
        if layer is not None and type(layer) is not nn.Identity:
            raise Unfusable(f"{name} is {type(layer).__name__} ({what}), which fastcnn's block does not compute")
    drop_path = getattr(module, "drop_path", None)
    if drop_path is not None and type(drop_path) is not nn.Identity and getattr(drop_path, "drop_prob", None) != 0:
        raise Unfusable(f"drop_path is {type(drop_path).__name__}({drop_path.extra_repr()}): stochastic depth "
                        "drops the residual branch at random in training")
    return _residual_block(kind, module)


def _stage_names(kind):
    convs = ("conv1", "conv2", "conv3") if kind is Bottleneck else ("conv1", "conv2")
    return (*convs, *(name.replace("conv", "bn") for name in convs))


def _require_only_children(module, allowed):
    """A child that fastcnn's block would not run (an SE module added to a torchvision-style block, a layer of a
    later timm version) makes the replacement inexact, whatever the forward does with it."""
    extra = [f"{name} ({type(child).__name__})" for name, child in module.named_children() if name not in allowed]
    if extra:
        raise Unfusable(f"has {', '.join(extra)}, which fastcnn's {type(module).__name__} does not compute")


def _residual_block(kind, module):
    """fastcnn's ``kind`` block built from ``module``'s channel counts, checked conv by conv and norm by norm against
    ``module``, holding ``module``'s tensors and its ``downsample`` module."""
    stages = _stage_names(kind)
    for name in stages:
        expected = nn.Conv2d if name.startswith("conv") else nn.BatchNorm2d
        if type(getattr(module, name, None)) is not expected:
            raise Unfusable(f"{name} is {type(getattr(module, name, None)).__name__}, not {expected.__name__}")
    conv1, conv2 = module.conv1, module.conv2
    if kind is BasicBlock:
        kwargs = dict(planes=conv1.out_channels, stride=conv1.stride[0], dilation=conv2.dilation[0])
    else:
        planes, groups = module.conv3.out_channels // Bottleneck.expansion, conv2.groups
        kwargs = dict(planes=planes, stride=conv2.stride[0], groups=groups, dilation=conv2.dilation[0],
                      base_width=conv2.out_channels * 64 // max(planes * groups, 1))
    try:
        with torch.device("meta"):  # build without allocating or consuming the RNG; the tensors come from `module`
            block = kind(conv1.in_channels, downsample=None, norm_layer=_same_norm(module.bn1), fused=True, **kwargs)
    except (ValueError, NotImplementedError) as error:  # e.g. a dilated BasicBlock
        raise Unfusable(f"fastcnn's {kind.__name__} cannot be built for it: {error}") from None
    for name in stages:
        theirs, ours = repr(getattr(module, name)), repr(getattr(block, name))
        if theirs != ours:
            raise Unfusable(f"{name} is {theirs}; fastcnn's {kind.__name__} would have {ours}")
    block.downsample = module.downsample
    return holding_state_of(block, module)


def _same_norm(norm):
    """A BatchNorm2d factory with ``norm``'s hyperparameters."""
    def factory(channels):
        return nn.BatchNorm2d(channels, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                              track_running_stats=norm.track_running_stats)
    return factory


def holding_state_of(block, module):
    """``block`` (built on the meta device) given ``module``'s tensors, requires_grad flags and training mode."""
    requires_grad = {name: p.requires_grad for name, p in module.named_parameters()}
    block.load_state_dict(module.state_dict(), strict=True, assign=True)
    for name, parameter in block.named_parameters():
        parameter.requires_grad_(requires_grad[name])
    if any(t.is_meta for t in (*block.parameters(), *block.buffers())):
        raise RuntimeError(f"fastcnn.convert: {type(module).__name__} has state that its state_dict does not carry")
    return block.train(module.training)


_INCEPTION_BRANCHES = ("branch1", "branch2", "branch3", "branch4")


def inception_block(module):
    """A fused InceptionBlock holding a torchvision-style ``Inception`` block's tensors: the block built from
    ``module``'s channel counts must print the same branches (the reprs list every stage's class, kernel, padding,
    groups, BatchNorm eps/momentum and pooling)."""
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
    except (AttributeError, IndexError, TypeError, ValueError) as error:
        raise Unfusable(f"not torchvision's Inception layout ({type(error).__name__}: {error})") from None
    differing = [name for name in _INCEPTION_BRANCHES if repr(getattr(block, name)) != repr(getattr(module, name))]
    if differing:
        raise Unfusable(f"{', '.join(differing)} differ from the InceptionBlock built from its channel counts")
    return holding_state_of(block, module)
