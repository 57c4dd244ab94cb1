"""VGG (Simonyan & Zisserman 2014) as torchvision builds it: same modules, indices, state_dict keys, parameter
counts and init, with Conv [-> BatchNorm] -> ReLU -> MaxPool runs fused when ``fused=True``.

torchvision's A, B, D, E (``vgg11/13/16/19`` and ``_bn``) are here, plus the paper's C (1×1 convs) and A-LRN. A
``width`` multiplier builds narrower nets (e.g. for quick CPU runs); ``width=1`` is torchvision's VGG.
"""
import torch
import torch.nn as nn

from ..nn.sequential_fusion import FusedSequential, fuse_layers
from ._registry import check_no_weights, register_model
from ._vgg_configs import CONFIGS, alexnet_lrn, conv_spec

_IMAGE_CHANNELS = 3
_POOLED_SIZE = (7, 7)
_HIDDEN_FEATURES = 4096


class VGG(nn.Module):
    """torchvision's VGG: ``features -> AdaptiveAvgPool2d((7, 7)) -> flatten -> classifier``.

    Args:
        features: the convolutional part (an ``nn.Sequential``); its last conv's channels size the classifier.
        num_classes: outputs of the last Linear layer (default 1000).
        init_weights: torchvision's init (default True): convs Kaiming-normal (fan_out, ReLU gain) with zero bias,
            BatchNorm weight 1 and bias 0, Linear N(0, 0.01) with zero bias. False keeps PyTorch's default init.
        dropout: dropout probability after the two hidden Linear layers (default 0.5).
        hidden_features: width of the two hidden Linear layers (default 4096, as torchvision).

    Shape:
        input ``(N, 3, H, W)`` with H, W >= 32 (five 2×2 pools); output ``(N, num_classes)``.

    Example:
        >>> model = fastcnn.models.vgg11(num_classes=10)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, features, num_classes=1000, init_weights=True, dropout=0.5, *,
                 hidden_features=_HIDDEN_FEATURES):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(_POOLED_SIZE)
        pooled_features = _last_conv(features).out_channels * _POOLED_SIZE[0] * _POOLED_SIZE[1]
        self.classifier = nn.Sequential(
            nn.Linear(pooled_features, hidden_features), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden_features, hidden_features), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden_features, num_classes),
        )
        if init_weights:
            self._init_weights()

    def _init_weights(self):
        # The same module order and the same init calls as torchvision, so a seeded build gives the same tensors.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


def _last_conv(features):
    convs = [m for m in features.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("fastcnn: VGG features must contain at least one nn.Conv2d")
    return convs[-1]


def _scaled(channels, width):
    return max(1, round(channels * width))


def make_layers(cfg, batch_norm=False, *, fused=True, width=1.0):
    """The ``features`` Sequential of a VGG configuration.

    Args:
        cfg: a configuration name (``"A"``, ``"A-LRN"``, ``"B"``, ``"C"``, ``"D"``, ``"E"``) or a layer list in the
            format of ``fastcnn.models._vgg_configs``.
        batch_norm: put ``BatchNorm2d`` between each conv and its ReLU (torchvision's ``_bn`` models).
        fused: replace each ``Conv2d, ReLU[, MaxPool2d]`` run by ``ConvReLU2d``/``ConvReLUPool2d`` at the conv's
            index with ``FusedAway`` placeholders in the other slots (same keys); with ``batch_norm``, each
            ``Conv2d, BatchNorm2d, ReLU[, MaxPool2d]`` run by ``ConvBNReLU2d``/``ConvBNReLUPool2d`` with a
            ``FusedBatchNorm2d`` holding the BatchNorm's state in its slot (see ``fastcnn.nn.sequential_fusion``).
        width: channel multiplier (default 1: the paper's 64 ... 512).

    Example:
        >>> [type(m).__name__ for m in make_layers([8, "M"])]
        ['ConvReLUPool2d', 'FusedAway', 'FusedAway']
    """
    entries = CONFIGS[cfg] if isinstance(cfg, str) else cfg
    layers = []
    in_channels = _IMAGE_CHANNELS
    for entry in entries:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif entry == "LRN":
            layers.append(alexnet_lrn())
        else:
            channels, kernel, padding = conv_spec(entry)
            channels = _scaled(channels, width)
            layers.append(nn.Conv2d(in_channels, channels, kernel_size=kernel, padding=padding))
            if batch_norm:
                layers.append(nn.BatchNorm2d(channels))
            layers.append(nn.ReLU(inplace=True))
            in_channels = channels
    return FusedSequential(*fuse_layers(layers)) if fused else nn.Sequential(*layers)


def vgg(cfg="D", batch_norm=False, *, fused=True, width=1.0, hidden_features=None, weights=None, progress=True,
        **kwargs):
    """A VGG of the paper's Table 1.

    Args:
        cfg: ``"A"`` (vgg11), ``"A-LRN"`` (A with AlexNet's LRN after the first conv, index 2 of ``features``),
            ``"B"`` (vgg13), ``"C"`` (D with 1×1 convs as the last conv of blocks 3-5), ``"D"`` (vgg16), ``"E"``
            (vgg19).
        batch_norm: BatchNorm after every conv (torchvision's ``_bn`` variants).
        fused: use fastcnn's fused Conv(+BatchNorm)+ReLU(+pool) modules (default) or the stock layers; both have
            the same state_dict.
        width: multiplies every conv's channels and the hidden Linear width (4096); ``width=0.125`` gives a
            ~2M-parameter net for quick CPU runs. The default 1 is torchvision's model.
        hidden_features: width of the two hidden Linear layers (default ``4096 * width``).
        weights, progress: torchvision's arguments; weights must be None (load a state_dict instead).
        **kwargs: ``num_classes``, ``init_weights``, ``dropout`` (see ``VGG``).

    Example:
        >>> model = fastcnn.models.vgg("C", num_classes=10, width=0.25)
    """
    check_no_weights(weights)
    if isinstance(cfg, str) and cfg not in CONFIGS:
        raise ValueError(f"fastcnn: cfg must be one of {sorted(CONFIGS)}, got {cfg!r}")
    if not width > 0:
        raise ValueError(f"fastcnn: width must be a positive number, got {width!r}")
    features = make_layers(cfg, batch_norm, fused=fused, width=width)
    if hidden_features is None:
        hidden_features = _scaled(_HIDDEN_FEATURES, width)
    return VGG(features, hidden_features=hidden_features, **kwargs)


def _named_vgg(name, cfg, batch_norm):
    def factory(*, weights=None, progress=True, fused=True, **kwargs):
        return vgg(cfg, batch_norm, fused=fused, weights=weights, progress=progress, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"torchvision's ``{name}``: VGG configuration {cfg}{' with BatchNorm' if batch_norm else ''}. "
                       "Arguments as ``vgg`` (``fused``, ``width``, ``hidden_features``, ``num_classes``, "
                       "``init_weights``, ``dropout``).")
    return register_model(factory)


vgg11 = _named_vgg("vgg11", "A", False)
vgg11_bn = _named_vgg("vgg11_bn", "A", True)
vgg13 = _named_vgg("vgg13", "B", False)
vgg13_bn = _named_vgg("vgg13_bn", "B", True)
vgg16 = _named_vgg("vgg16", "D", False)
vgg16_bn = _named_vgg("vgg16_bn", "D", True)
vgg19 = _named_vgg("vgg19", "E", False)
vgg19_bn = _named_vgg("vgg19_bn", "E", True)
register_model(vgg)
