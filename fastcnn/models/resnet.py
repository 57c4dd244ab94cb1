"""ResNet (He et al. 2015, torchvision's "v1.5" with the Bottleneck stride on the 3×3 conv) built from fastcnn's
residual blocks: torchvision's modules, state_dict keys, parameter counts and init.

With ``fused=True`` the residual blocks run fastcnn's fused ops. The stem (``conv1 -> bn1 -> relu -> maxpool``)
stays stock: BatchNorm sits between the conv and the ReLU, and the 3×3/s2 max-pool has padding, which the fused
conv block does not take.
"""
import torch
import torch.nn as nn

from ..nn.residual import BasicBlock, Bottleneck
from ._registry import check_no_weights, register_model

_STEM_CHANNELS = 64
_STAGE_PLANES = (64, 128, 256, 512)


def _scaled(channels, width):
    return max(1, round(channels * width))


class ResNet(nn.Module):
    """torchvision's ResNet: stem, four stages of residual blocks, global average pool and a Linear head.

    Args:
        block: ``fastcnn.nn.BasicBlock`` or ``fastcnn.nn.Bottleneck``.
        layers: blocks per stage, e.g. ``[3, 4, 6, 3]``.
        num_classes: outputs of ``fc`` (default 1000).
        zero_init_residual: zero the last BatchNorm weight of every block (``bn2``/``bn3``) so each block starts
            as the identity (Goyal et al. 2017).
        groups, width_per_group: the Bottleneck's grouped 3×3 conv (ResNeXt / wide ResNets).
        replace_stride_with_dilation: three booleans; True dilates stage 2/3/4 instead of striding it.
        norm_layer: normalisation factory (default ``nn.BatchNorm2d``).
        fused: build the residual blocks with ``fused=True`` (default) or ``False``; same state_dict either way.
        width: multiplies the channels of the stem and of every stage (as VGG's ``width``; e.g. 0.25 for a quick
            CPU run). Same state_dict keys at any width; ``width=1`` is torchvision's ResNet.

    Shape:
        input ``(N, 3, H, W)``; output ``(N, num_classes)``.

    Example:
        >>> model = fastcnn.models.resnet18(num_classes=10)
        >>> model(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(self, block, layers, num_classes=1000, zero_init_residual=False, groups=1, width_per_group=64,
                 replace_stride_with_dilation=None, norm_layer=None, *, fused=True, width=1.0):
        super().__init__()
        if not (isinstance(width, (int, float)) and width > 0):
            raise ValueError(f"fastcnn: width must be a positive number, got {width!r}")
        self._norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("fastcnn: replace_stride_with_dilation must be None or 3 booleans, got "
                             f"{replace_stride_with_dilation!r}")
        if len(layers) != 4:
            raise ValueError(f"fastcnn: layers must give the number of blocks of the 4 stages, got {layers!r}")
        self.inplanes = _scaled(_STEM_CHANNELS, width)
        self.dilation = 1
        self.groups = groups
        self.base_width = width_per_group
        self.fused = fused
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        dilate = [False, *replace_stride_with_dilation]
        for index, (planes, blocks) in enumerate(zip(_STAGE_PLANES, layers)):
            stride = 1 if index == 0 else 2
            setattr(self, f"layer{index + 1}", self._make_layer(block, _scaled(planes, width), blocks, stride,
                                                                dilate[index]))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(_scaled(_STAGE_PLANES[-1], width) * block.expansion, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual):
        # torchvision's init, in its module order (a seeded build gives the same tensors); fc keeps Linear's default.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                last_norm = module.bn3 if isinstance(module, Bottleneck) else \
                    module.bn2 if isinstance(module, BasicBlock) else None
                if last_norm is not None and last_norm.weight is not None:
                    nn.init.zeros_(last_norm.weight)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        """One stage: a first block that may stride (or dilate) and widen, with a 1×1 conv + norm downsample on
        the identity when its shape changes, then ``blocks - 1`` blocks at the new width."""
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        out_planes = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out_planes, kernel_size=1, stride=stride, bias=False),
                                       self._norm_layer(out_planes))
        stage = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation,
                       self._norm_layer, fused=self.fused)]
        self.inplanes = out_planes
        stage += [block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                        dilation=self.dilation, norm_layer=self._norm_layer, fused=self.fused)
                  for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        return self.fc(torch.flatten(x, 1))


def _named_resnet(name, block, layers):
    def factory(*, weights=None, progress=True, fused=True, **kwargs):
        check_no_weights(weights)
        return ResNet(block, layers, fused=fused, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"torchvision's ``{name}``: ``ResNet({block.__name__}, {layers})``. Arguments as ``ResNet`` "
                       "(``fused``, ``width``, ``num_classes``, ``zero_init_residual``, ``groups``, "
                       "``width_per_group``, ``replace_stride_with_dilation``, ``norm_layer``); ``weights`` must be "
                       "None.")
    return register_model(factory)


resnet18 = _named_resnet("resnet18", BasicBlock, [2, 2, 2, 2])
resnet34 = _named_resnet("resnet34", BasicBlock, [3, 4, 6, 3])
resnet50 = _named_resnet("resnet50", Bottleneck, [3, 4, 6, 3])
resnet101 = _named_resnet("resnet101", Bottleneck, [3, 4, 23, 3])
resnet152 = _named_resnet("resnet152", Bottleneck, [3, 8, 36, 3])
