"""Encoder-decoder multi-task network (smp's U-Net with ``aux_params``): a zoo encoder downsamples to a latent map,
a decoder of fused transposed convolutions returns to image resolution, and two heads share the latent -
classification (global average pool + linear) and per-pixel segmentation."""
import importlib
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import nn as fnn
from ._registry import register_model

# The package re-exports the factories ``vgg`` and ``resnet*``, which shadow the submodule names; look them up here.
_VGG = importlib.import_module(".vgg", __package__)
_RESNET = importlib.import_module(".resnet", __package__)


def _vgg_stages(model):
    """Split VGG features after each pool's slot (a MaxPool2d, or the placeholder of one a fused conv computes): one
    stage per factor of 2, of the features' Sequential class (a fused run stays inside one stage). Layers keep their
    ``features`` index as name, so fused and stock encoders have the same state_dict keys."""
    stages, current = [], OrderedDict()
    for name, layer in model.features.named_children():
        current[name] = layer
        if isinstance(layer.layer if isinstance(layer, fnn.FusedAway) else layer, nn.MaxPool2d):
            stages.append(type(model.features)(current))
            current = OrderedDict()
    return stages


def _resnet_stages(model):
    return [nn.Sequential(model.conv1, model.bn1, model.relu), nn.Sequential(model.maxpool, model.layer1),
            model.layer2, model.layer3, model.layer4]


def _stage_channels(stages, in_channels):
    x, channels = torch.zeros(1, in_channels, 32, 32), []
    with torch.no_grad():
        for stage in stages:
            x = stage(x)
            channels.append(x.shape[1])
    return channels


class EncoderDecoder(nn.Module):
    """Shared encoder, U-Net-style decoder, segmentation and classification heads.

    Args:
        encoder: a zoo name: ``"vgg11"``...``"vgg19_bn"`` or ``"resnet18"``...``"resnet152"``.
        num_classes: classes of the classification head (None: no head).
        num_seg_classes: classes of the segmentation head (None: no head).
        upsample: ``"transpose"`` (fused 2x2 stride-2 ConvTranspose2d + ReLU), ``"nearest"`` or ``"bilinear"``.
        skip_connections: concatenate the encoder's feature map of the same resolution (U-Net).
        fused: fastcnn's fused modules (default) or stock ones; same state_dict either way.
        in_channels: image channels (default 3).
        width: channel multiplier of a VGG encoder (default 1: torchvision's widths; e.g. 0.25 for quick CPU runs);
            the decoder's widths follow the encoder's.

    Shape:
        input ``(N, in_channels, H, W)`` with H and W divisible by the encoder's total stride (32);
        returns ``(seg_logits (N, num_seg_classes, H, W), cls_logits (N, num_classes))``, None for an absent head.

    Example:
        >>> model = EncoderDecoder("vgg11", num_classes=3, num_seg_classes=4)
        >>> seg, cls = model(torch.randn(2, 3, 32, 32))
    """

    def __init__(self, encoder="vgg11", num_classes=None, num_seg_classes=2, upsample="transpose",
                 skip_connections=True, fused=True, in_channels=3, width=1.0):
        super().__init__()
        if num_classes is None and num_seg_classes is None:
            raise ValueError("fastcnn: encoder_decoder needs num_classes or num_seg_classes")
        if upsample not in ("transpose", "nearest", "bilinear"):
            raise ValueError(f"fastcnn: upsample must be 'transpose', 'nearest' or 'bilinear', got {upsample!r}")
        if encoder.startswith("vgg"):
            stages = _vgg_stages(getattr(_VGG, encoder)(fused=fused, width=width))
        elif width != 1.0:
            raise ValueError(f"fastcnn: width applies to a VGG encoder only, got width={width!r} for {encoder!r}")
        elif encoder.startswith("resnet"):
            stages = _resnet_stages(getattr(_RESNET, encoder)(fused=fused))
        else:
            raise ValueError(f"fastcnn: encoder must be a vgg* or resnet* name, got {encoder!r}")
        if in_channels != 3:
            raise ValueError("fastcnn: encoder_decoder supports in_channels=3; repeat grey images to 3 channels")
        self.encoder = nn.ModuleList(stages)
        self.total_stride = 2 ** len(stages)
        self.upsample, self.skip_connections, self.fused = upsample, skip_connections, fused
        channels = _stage_channels(stages, in_channels)
        self.decoder = nn.ModuleList()
        self.up = nn.ModuleList()
        c = channels[-1]
        for i in reversed(range(len(stages))):
            skip = channels[i - 1] if (skip_connections and i > 0) else 0
            out = max(channels[i - 1] if i > 0 else channels[0] // 2, 16)
            if upsample == "transpose":
                self.up.append(fnn.ConvTranspose2d(c, c, 2, stride=2, activation="relu") if fused else
                               nn.ConvTranspose2d(c, c, 2, stride=2))
            self.decoder.append(fnn.ConvReLU2d(c + skip, out, 3, padding=1) if fused else
                                nn.Conv2d(c + skip, out, 3, padding=1))
            c = out
        self.seg_head = nn.Conv2d(c, num_seg_classes, 3, padding=1) if num_seg_classes else None
        self.cls_head = nn.Linear(channels[-1], num_classes) if num_classes else None

    def forward(self, x):
        h, w = x.shape[-2:]
        s = self.total_stride
        if h % s or w % s:
            raise ValueError(f"fastcnn: input size {h}x{w} must be divisible by the encoder's total stride {s}; "
                             f"pad or resize to e.g. {-(-h // s) * s}x{-(-w // s) * s}")
        features = []
        for stage in self.encoder:
            x = stage(x)
            features.append(x)
        latent = features[-1]
        cls_logits = self.cls_head(latent.mean((2, 3))) if self.cls_head is not None else None
        if self.seg_head is None:
            return None, cls_logits
        for i, conv in enumerate(self.decoder):
            if self.upsample == "transpose":
                x = self.up[i](x) if self.fused else F.relu(self.up[i](x))
            else:
                x = F.interpolate(x, scale_factor=2, mode=self.upsample)
            level = len(features) - 2 - i
            if self.skip_connections and level >= 0:
                x = torch.cat([x, features[level]], 1)
            x = conv(x) if self.fused else F.relu(conv(x))
        return self.seg_head(x), cls_logits


@register_model
def encoder_decoder(encoder="vgg11", num_classes=None, num_seg_classes=2, upsample="transpose",
                    skip_connections=True, *, fused=True, **kwargs):
    """Builds an :class:`EncoderDecoder`; arguments as there."""
    return EncoderDecoder(encoder, num_classes, num_seg_classes, upsample, skip_connections, fused, **kwargs)
