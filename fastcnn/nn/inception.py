"""Drop-in Inception block: torchvision's GoogLeNet ``Inception`` (same constructor, submodules, init and state_dict
keys) whose fused forward writes every branch straight into its channel slice of the concatenated output.

torchvision computes the four branches - ``1x1``; ``1x1 -> 3x3``; ``1x1 -> 3x3`` (the paper's 5x5 branch, see
``branch3_kernel_size``); ``3x3 max-pool -> 1x1`` - each ending in Conv2d -> BatchNorm2d -> ReLU, then copies them all
into ``torch.cat``. Here the output is allocated once, in the input's memory format, and each branch's last BatchNorm
+ ReLU stores into its slice ``out[:, offset : offset + C_i]`` (fastcnn.ops.channel_slice); the concatenation copy,
and the four branch activations it would read, are never made.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.channel_slice import BranchEpilogue, concat_branches
from ..ops import memory_format_of
from ..ops._dispatch import CPU_RESULTS, STOCK, ModuleRoutes, Route
from ._batch_norm_fusion import (
    norm_relu_conv2d,
    running_scale_shift,
    statistics_mode,
    update_running_statistics,
    uses_batch_statistics,
)
from .unfused import is_unfused

_RESULTS = f"{CPU_RESULTS}_inception.json"
# On CPU the fused block does not beat stock (GoogLeNet inception3a, float32, paired rounds, stock / fused): 0.89x
# inference, 1.00x training (routed to stock: 1.00x) - so there it runs its stock branches until a measurement says
# otherwise.
ROUTES = ModuleRoutes("inception block", [
    Route(STOCK, measured=f"{_RESULTS}#inception3a-train", device="cpu", dtypes=(torch.float32,), mode="train"),
    Route(STOCK, measured=f"{_RESULTS}#inception3a-infer", device="cpu", dtypes=(torch.float32,), mode="eval"),
])


class BasicConv2d(nn.Module):
    """torchvision's GoogLeNet ``BasicConv2d``: ``relu(bn(conv(x)))`` with a bias-free ``Conv2d`` and
    ``BatchNorm2d(eps=0.001)``; state_dict keys ``conv.weight``, ``bn.*``. It holds the parameters of one Inception
    stage; ``InceptionBlock`` fuses it with its neighbours.

    Args:
        in_channels, out_channels: channels of the convolution.
        **kwargs: further ``nn.Conv2d`` arguments (kernel_size, padding, groups, ...).

    Shape:
        input ``(N, in_channels, H, W)``; output ``(N, out_channels, H_out, W_out)`` as ``nn.Conv2d``'s.

    Example:
        >>> unit = fastcnn.nn.BasicConv2d(3, 8, kernel_size=3, padding=1)
        >>> unit(torch.randn(2, 3, 7, 7)).shape
        torch.Size([2, 8, 7, 7])
    """

    def __init__(self, in_channels, out_channels, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _is_basic_conv(unit):
    """Whether ``unit`` computes ``relu(bn(conv(x)))`` with a stock bias-free convolution: fastcnn's BasicConv2d or
    torchvision's (recognised by name, so fastcnn does not import torchvision)."""
    kind = type(unit)
    known = kind is BasicConv2d or (kind.__name__ == "BasicConv2d"
                                    and kind.__module__ == "torchvision.models.googlenet")
    return known and type(unit.conv) is nn.Conv2d and unit.conv.bias is None \
        and unit.conv.padding_mode == "zeros" and not isinstance(unit.conv.padding, str) \
        and type(unit.bn) is nn.BatchNorm2d


def _conv_args(conv):
    return conv.stride, conv.padding, conv.dilation, conv.groups


class InceptionBlock(nn.Module):
    """torchvision's GoogLeNet ``Inception`` block: ``cat([branch1(x), branch2(x), branch3(x), branch4(x)], 1)``.

    * ``branch1``: 1x1 conv; ``branch2``: 1x1 conv -> 3x3 conv; ``branch3``: 1x1 conv -> kxk conv;
      ``branch4``: 3x3/1 max-pool (padding 1, ceil_mode) -> 1x1 conv. Every conv is a ``conv_block`` (default
      ``BasicConv2d``: Conv2d(bias=False) -> BatchNorm2d(eps=0.001) -> ReLU).
    * torchvision's "5x5" branch uses a 3x3 kernel (pytorch/vision#906, kept for its pretrained weights): that is
      the default ``branch3_kernel_size=3``; ``branch3_kernel_size=5`` builds the paper's 5x5 branch.

    Fused forward (``fused=True`` and every stage a BasicConv2d): the output is allocated once in the input's memory
    format and each branch's last BatchNorm + ReLU stores straight into its channel slice; in training the inner
    BN + ReLU of branches 2 and 3 runs inside the next convolution's input; in eval each BatchNorm is a per-channel
    affine map (from its running statistics, recomputed at every forward) in the pass after its convolution.
    Anything else - another ``conv_block``, ``fused=False``, ``fastcnn.nn.unfused()`` - runs torchvision's module
    sequence and ``torch.cat``.

    Args:
        in_channels: input channels.
        ch1x1: output channels of branch1.
        ch3x3red, ch3x3: channels of branch2's 1x1 reduction and its 3x3 convolution.
        ch5x5red, ch5x5: channels of branch3's 1x1 reduction and its kxk convolution.
        pool_proj: output channels of branch4's 1x1 projection.
        conv_block: factory ``conv_block(in, out, kernel_size=..., padding=...)`` of the stages; default BasicConv2d.
        fused: run the fused forward (default) instead of the stock module sequence (keyword-only).
        branch3_kernel_size: kernel size of branch3's second convolution, odd (keyword-only; default 3).
        groups: groups of the 3x3 and kxk convolutions of branches 2 and 3 (keyword-only; default 1). Must divide
            ch3x3red, ch3x3, ch5x5red and ch5x5.

    Shape:
        input ``(N, in_channels, H, W)``; output ``(N, ch1x1 + ch3x3 + ch5x5 + pool_proj, H, W)``.

    Example:
        >>> block = fastcnn.nn.InceptionBlock(192, 64, 96, 128, 16, 32, 32)
        >>> block(torch.randn(2, 192, 28, 28)).shape
        torch.Size([2, 256, 28, 28])
    """

    def __init__(self, in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj, conv_block=None, *,
                 fused=True, branch3_kernel_size=3, groups=1):
        super().__init__()
        _check_arguments(ch3x3red, ch3x3, ch5x5red, ch5x5, branch3_kernel_size, groups)
        if conv_block is None:
            conv_block = BasicConv2d
        grouped = {} if groups == 1 else {"groups": groups}  # a conv_block need not know the argument otherwise
        k = branch3_kernel_size
        self.branch1 = conv_block(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            conv_block(in_channels, ch3x3red, kernel_size=1),
            conv_block(ch3x3red, ch3x3, kernel_size=3, padding=1, **grouped))
        self.branch3 = nn.Sequential(
            conv_block(in_channels, ch5x5red, kernel_size=1),
            conv_block(ch5x5red, ch5x5, kernel_size=k, padding=k // 2, **grouped))
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            conv_block(in_channels, pool_proj, kernel_size=1))
        self.fused = fused

    def _chains(self):
        """Each branch as (module producing its input from x, or None for x itself; its conv stages)."""
        return ((None, (self.branch1,)), (None, tuple(self.branch2)), (None, tuple(self.branch3)),
                (self.branch4[0], (self.branch4[1],)))

    def _runs_stock(self, x):
        """Whether the route sends this call to the stock layers (keyed on branch1's BatchNorm mode; a branch1
        without one cannot be fused anyway)."""
        norm = self._modules["branch1"]._modules.get("bn")
        return norm is None or ROUTES.runs_stock(x, statistics_mode(norm))

    def _can_fuse(self):
        return self.fused and isinstance(self.branch2, nn.Sequential) and isinstance(self.branch3, nn.Sequential) \
            and isinstance(self.branch4, nn.Sequential) and len(self.branch4) == 2 \
            and all(_is_basic_conv(unit) for _, units in self._chains() for unit in units)

    def forward(self, x):
        # The route first: on CPU it sends the block to its stock layers, and _can_fuse reads every unit's modules
        # through nn.Module.__getattr__ (~100 us with the caches evicted, 2.5% of the block's inference).
        if is_unfused() or self._runs_stock(x) or not self._can_fuse():
            return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)
        branches = [self._branch_epilogue(units, x if pre is None else pre(x)) for pre, units in self._chains()]
        out, stats = concat_branches(branches, memory_format_of(x))
        for (_, units), branch, pair in zip(self._chains(), branches, stats):
            if pair is not None:
                y = branch.input
                update_running_statistics(units[-1].bn, *pair, y.numel() // y.shape[1])
        return out

    def _branch_epilogue(self, units, x):
        """The branch's last convolution output and how it is normalised before the ReLU (batch statistics, or the
        running statistics as a per-channel affine map computed from the live tensors at every call)."""
        y = F.conv2d(x, units[0].conv.weight, None, *_conv_args(units[0].conv))
        for unit, following in zip(units, units[1:]):
            y = norm_relu_conv2d(y, unit.bn, following.conv)
        norm = units[-1].bn
        if uses_batch_statistics(norm):
            return BranchEpilogue(y, norm.weight, norm.bias, norm.eps)
        return BranchEpilogue(y, *running_scale_shift(norm, y.dtype))

    def extra_repr(self):
        return f"fused={self.fused}"


def _check_arguments(ch3x3red, ch3x3, ch5x5red, ch5x5, branch3_kernel_size, groups):
    if not isinstance(branch3_kernel_size, int) or branch3_kernel_size < 1 or branch3_kernel_size % 2 == 0:
        raise ValueError(f"InceptionBlock: branch3_kernel_size must be a positive odd int (3 as torchvision, 5 as "
                         f"the paper), got {branch3_kernel_size!r}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"InceptionBlock: groups must be a positive int, got {groups!r}")
    channels = dict(ch3x3red=ch3x3red, ch3x3=ch3x3, ch5x5red=ch5x5red, ch5x5=ch5x5)
    bad = {name: value for name, value in channels.items() if value % groups}
    if bad:
        listed = ", ".join(f"{name}={value}" for name, value in bad.items())
        raise ValueError(f"InceptionBlock: groups={groups} must divide the channels of the grouped convolutions "
                         f"(ch3x3red, ch3x3, ch5x5red, ch5x5); it does not divide {listed}")
