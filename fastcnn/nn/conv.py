"""Drop-in fused convolution modules. Each IS an ``nn.Conv2d`` (same constructor, defaults, init, parameters and
state_dict keys ``weight``/``bias``) whose forward also applies the ReLU and, for ConvReLUPool2d, the pool - except
while its ``FusedSequential`` runs slot by slot (``fastcnn.nn.unfused()``), when it is the plain convolution and the
placeholders after it apply the ReLU and the pool."""
import torch.nn as nn
import torch.nn.functional as F

from .. import functional
from ..ops import pair
from ..ops._dispatch import module_runs_stock
from ..ops.conv_relu_pool import route_mode, runs_stock
from ..ops.conv_relu_pool.reference import relu_pool
from .unfused import in_stock_slot


class _FusedConv2d(nn.Conv2d):
    """Shared plumbing: padding modes other than zeros pad first, exactly as nn.Conv2d does. Where the op's route
    sends a call to stock PyTorch (`runs_stock`), the modules run as the stock layers they replace - nn.Conv2d's
    forward, an in-place ReLU, the pool - and a routed call costs no more than the stock layers (the answer is
    remembered per input signature: `module_runs_stock`)."""

    def _op_padding(self):
        """The zero padding the fused op gets: the module's, or none where another padding mode pads first."""
        return self.padding if self.padding_mode == "zeros" else (0, 0)

    def _fused_conv_args(self, input):
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        return input, self._op_padding()

    def _route_says_stock(self, input, mode):
        """Whether the op's route sends this call in `mode` (`route_mode`) to stock (the route sees the padding the
        op would get); the forward asks `module_runs_stock`, which remembers the answer per input signature."""
        return runs_stock(input, self.weight, mode, self.stride, self._op_padding(), self.dilation, self.groups)

    @staticmethod
    def _check_relu(relu):
        if not isinstance(relu, nn.ReLU):
            raise TypeError(f"fastcnn: relu must be an nn.ReLU, got {type(relu).__name__}")

    @classmethod
    def _from_conv(cls, conv, **extra):
        """A fused module sharing ``conv``'s Parameters (so its state_dict and optimizer state carry over)."""
        if type(conv) is not nn.Conv2d:
            raise TypeError(f"fastcnn: conv must be an nn.Conv2d, got {type(conv).__name__}")
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode, device="meta", **extra)
        fused.weight, fused.bias = conv.weight, conv.bias
        return fused


class ConvReLU2d(_FusedConv2d):
    """``Conv2d -> ReLU`` in one op. Arguments, init and state_dict exactly as ``nn.Conv2d``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device,
        dtype: as ``nn.Conv2d``.

    Shape:
        input ``(N, C_in, H, W)`` or ``(C_in, H, W)``; output as ``nn.Conv2d``'s.

    Example:
        >>> layer = fastcnn.nn.ConvReLU2d(3, 16, 3, padding=1)
        >>> layer(torch.randn(4, 3, 32, 32)).shape
        torch.Size([4, 16, 32, 32])
    """

    def forward(self, input):
        if in_stock_slot():
            return super().forward(input)
        mode = route_mode("none", input, self.weight, self.bias)
        if module_runs_stock(self, input, mode, self._route_says_stock):
            return relu_pool(super().forward(input), "none", None, None)
        input, padding = self._fused_conv_args(input)
        return functional.conv2d_relu(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)

    @classmethod
    def from_modules(cls, conv, relu):
        """The fused equivalent of ``nn.Sequential(conv, relu)``, sharing conv's parameters."""
        cls._check_relu(relu)
        return cls._from_conv(conv)


class ConvReLUPool2d(_FusedConv2d):
    """``Conv2d -> ReLU -> MaxPool2d/AvgPool2d`` in one op, saving only the pooled output for backward.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device,
        dtype: as ``nn.Conv2d``.
        pool: ``"max"`` (default) or ``"avg"``.
        pool_size: pooling window (default 2).
        pool_stride: pooling stride (default: ``pool_size``). Floor mode, no pool padding.

    Shape:
        input ``(N, C_in, H, W)`` or ``(C_in, H, W)``; output ``(N, C_out, H_p, W_p)`` with
        ``H_p = (H_conv - pool_size) // pool_stride + 1``.

    Example:
        >>> block = fastcnn.nn.ConvReLUPool2d(3, 64, 3, padding=1)
        >>> block(torch.randn(2, 3, 224, 224)).shape
        torch.Size([2, 64, 112, 112])
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, pool="max", pool_size=2,
                 pool_stride=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.pool, self.pool_size, self.pool_stride = pool_options(pool, pool_size, pool_stride)

    def forward(self, input):
        if in_stock_slot():
            return super().forward(input)
        mode = route_mode(self.pool, input, self.weight, self.bias)
        if module_runs_stock(self, input, mode, self._route_says_stock):
            return relu_pool(super().forward(input), self.pool, self.pool_size, self.pool_stride)
        input, padding = self._fused_conv_args(input)
        return functional.conv2d_relu_pool(input, self.weight, self.bias, self.stride, padding, self.dilation,
                                           self.groups, self.pool, self.pool_size, self.pool_stride)

    def extra_repr(self):
        return f"{super().extra_repr()}, pool={self.pool!r}, pool_size={self.pool_size}, pool_stride={self.pool_stride}"

    @classmethod
    def from_modules(cls, conv, relu, pool):
        """The fused equivalent of ``nn.Sequential(conv, relu, pool)``, sharing conv's parameters. ``pool`` must be
        an ``nn.MaxPool2d`` or ``nn.AvgPool2d`` without padding, ceil_mode, dilation, indices or divisor override."""
        cls._check_relu(relu)
        return cls._from_conv(conv, **pool_module_options(pool))


def pool_options(pool, pool_size, pool_stride):
    """Checked ``(pool, pool_size, pool_stride)`` of a fused conv + pool module (stride None: the window size)."""
    if pool not in ("max", "avg"):
        raise ValueError(f"fastcnn: pool must be 'max' or 'avg', got {pool!r}")
    pool_size = pair(pool_size, "pool_size", 1)
    return pool, pool_size, pool_size if pool_stride is None else pair(pool_stride, "pool_stride", 1)


def pool_module_options(pool):
    """The ``pool``, ``pool_size``, ``pool_stride`` arguments equivalent to a stock pool module; ``pool`` must be an
    ``nn.MaxPool2d`` or ``nn.AvgPool2d`` without padding, ceil_mode, dilation, indices or divisor override."""
    if isinstance(pool, nn.MaxPool2d):
        kind = "max"
        unsupported = pair(pool.padding, "pool padding", 0) != (0, 0) or pool.ceil_mode or pool.return_indices \
            or pair(pool.dilation, "pool dilation", 1) != (1, 1)
    elif isinstance(pool, nn.AvgPool2d):
        kind = "avg"
        unsupported = pair(pool.padding, "pool padding", 0) != (0, 0) or pool.ceil_mode \
            or pool.divisor_override is not None
    else:
        raise TypeError(f"fastcnn: pool must be an nn.MaxPool2d or nn.AvgPool2d, got {type(pool).__name__}")
    if unsupported:
        raise ValueError(f"fastcnn: cannot fuse {pool}: only floor-mode pools without padding, dilation, "
                         "return_indices or divisor_override are supported")
    return dict(pool=kind, pool_size=pool.kernel_size, pool_stride=pool.stride or pool.kernel_size)
