"""Drop-in ResNet residual blocks: torchvision's ``BasicBlock`` and ``Bottleneck`` (same constructor, attributes,
init and state_dict keys), whose forward runs fastcnn's fused ops when ``fused=True``."""
import torch
import torch.nn as nn

from ..ops import batch_norm as bn_ops
from ..ops._dispatch import CPU_RESULTS, STOCK, ModuleRoutes, Route
from ._batch_norm_fusion import (
    conv_statistics,
    norm_relu_conv2d_statistics,
    running_scale_shift,
    statistics_mode,
    update_running_statistics,
    uses_batch_statistics,
)
from .unfused import is_unfused

# On CPU the fused blocks do not beat stock (float32, paired rounds, stock / fused): Bottleneck layer1 1.01x
# inference / 0.99x training, layer2 0.97x / 0.94x (routed to stock: 0.99-1.01x). The convolutions (oneDNN, the same
# calls) are ~75% of a step; what is left is too small for the saved passes to pay for the per-op overhead of the
# fused chain. So on CPU the blocks run their stock layers until a measurement says otherwise.
ROUTES = ModuleRoutes("residual block", [
    Route(STOCK, measured=f"{CPU_RESULTS}_residual.json#layer2-train", device="cpu", dtypes=(torch.float32,),
          mode="train"),
    Route(STOCK, measured=f"{CPU_RESULTS}_residual.json#layer2-infer", device="cpu", dtypes=(torch.float32,),
          mode="eval"),
])


def _conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def _conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class _ResidualBlock(nn.Module):
    """Shared forward: the block is a chain of (conv, norm) stages with ReLU between them, then
    ``relu(last_stage(x) + identity)``, where identity is ``downsample(x)`` or ``x``.

    Fused forward (BatchNorm2d norms only; anything else, inside ``fastcnn.nn.unfused()``, or where ``ROUTES``
    measured the fused block slower than stock - float32 on CPU - runs the stock module sequence):

    * training: each convolution's output ``y`` gets its batch statistics from one fused reduction (in the
      convolution's epilogue on the triton backend, where fastcnn runs its own convolution); BN-apply + ReLU
      run inside the next convolution's input (recomputed in backward instead of stored), and the last BN +
      residual add + ReLU is one pass that saves a uint8 mask. Saved for backward: the block input, each ``y`` and
      the mask - not the post-BN or post-ReLU activations.
    * eval (BatchNorm on running statistics): each BatchNorm is the per-channel affine map
      ``y * gamma / sqrt(var + eps) + (beta - mean * gamma / sqrt(var + eps))`` applied in the epilogue pass that
      follows its convolution (with the ReLU, and for the last stage the residual add): two passes over
      activations where stock makes five. The map is computed from the live parameters and buffers at every
      forward (C values per BatchNorm); nothing derived is cached, so the block can never run on stale weights,
      whatever changed them (an optimizer step, ``.data`` edits, ``load_state_dict``, a running-statistics update).
    """

    STAGES = ()  # the (conv, norm) child names of each stage, in order

    def _stages(self):
        """The (conv, norm) modules of each stage. Read from ``_modules``, where ``nn.Module.__getattr__`` finds them
        too, without going through it: with the caches evicted before each call (as between a network's layers) its
        Python cost ~10 us per name, and a stock-routed block must cost no more than torchvision's."""
        layers = self._modules
        return tuple((layers[conv], layers[norm]) for conv, norm in self.STAGES)

    def forward(self, x):
        # The route first: on CPU it sends the block to its stock layers whatever they are, so the cheapest test.
        if is_unfused() or ROUTES.runs_stock(x, statistics_mode(self._modules["bn1"])) or not self._can_fuse():
            return self._stock_forward(x)
        return self._fused_forward(x)

    def _can_fuse(self):
        return self.fused and all(type(norm) is nn.BatchNorm2d and type(conv) is nn.Conv2d
                                  and conv.padding_mode == "zeros" and conv.bias is None
                                  for conv, norm in self._stages())

    def _stock_forward(self, x):
        stages, relu = self._stages(), self._modules["relu"]
        out = x
        for conv, norm in stages[:-1]:
            out = relu(norm(conv(out)))
        conv, norm = stages[-1]
        out = norm(conv(out))
        out += x if self.downsample is None else self.downsample(x)  # in place, as torchvision's blocks add
        return relu(out)

    def _fused_forward(self, x):
        stages = self._stages()
        conv, norm = stages[0]
        y, stats = conv_statistics(x, conv)
        for conv, next_norm in stages[1:]:
            y, stats = norm_relu_conv2d_statistics(y, stats, norm, conv)
            norm = next_norm
        identity = x if self.downsample is None else self.downsample(x)
        if not uses_batch_statistics(norm):
            return bn_ops.scale_shift_add_relu(y, *running_scale_shift(norm, y.dtype), identity)
        out, mean, var = bn_ops.batch_norm_add_relu(y, norm.weight, norm.bias, norm.eps, identity, stats=stats)
        update_running_statistics(norm, mean, var, y.numel() // y.shape[1])
        return out

    def extra_repr(self):
        return f"fused={self.fused}"


class BasicBlock(_ResidualBlock):
    """torchvision's ResNet ``BasicBlock``: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + identity)``.

    Args:
        inplanes: input channels.
        planes: output channels of both 3x3 convolutions.
        stride: stride of conv1 (the downsample module must downsample the identity to match).
        downsample: optional module applied to ``x`` to form the identity.
        groups, base_width, dilation: must be 1, 64, 1 (as torchvision's BasicBlock requires).
        norm_layer: normalization layer factory, default ``nn.BatchNorm2d``.
        fused: run the fused fastcnn ops (default) instead of the stock module sequence.

    Shape:
        input ``(N, inplanes, H, W)``; output ``(N, planes, H_out, W_out)`` with ``H_out = (H - 1) // stride + 1``.

    Example:
        >>> block = fastcnn.nn.BasicBlock(64, 64)
        >>> block(torch.randn(2, 64, 14, 14)).shape
        torch.Size([2, 64, 14, 14])
    """

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None, *, fused=True):
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self.fused = fused

    STAGES = (("conv1", "bn1"), ("conv2", "bn2"))


class Bottleneck(_ResidualBlock):
    """torchvision's ResNet ``Bottleneck`` (v1.5, stride on the 3x3 conv):
    ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + identity)``.

    Args:
        inplanes: input channels.
        planes: the block outputs ``planes * 4`` channels; the inner width is
            ``int(planes * base_width / 64) * groups``.
        stride: stride of conv2 (the downsample module must downsample the identity to match).
        downsample: optional module applied to ``x`` to form the identity.
        groups: groups of the 3x3 convolution.
        base_width: width per group, default 64.
        dilation: dilation (and padding) of the 3x3 convolution.
        norm_layer: normalization layer factory, default ``nn.BatchNorm2d``.
        fused: run the fused fastcnn ops (default) instead of the stock module sequence.

    Shape:
        input ``(N, inplanes, H, W)``; output ``(N, 4 * planes, H_out, W_out)`` with ``H_out = (H - 1) // stride + 1``.

    Example:
        >>> block = fastcnn.nn.Bottleneck(256, 64)
        >>> block(torch.randn(2, 256, 14, 14)).shape
        torch.Size([2, 256, 14, 14])
    """

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None, *, fused=True):
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.fused = fused

    STAGES = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
