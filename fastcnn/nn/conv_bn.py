"""``Conv2d -> BatchNorm2d -> ReLU [-> MaxPool2d/AvgPool2d]`` fused, keeping the BatchNorm's state in its own slot.

A fused layer sequence must keep torchvision's state_dict keys: the conv's ``features.{i}.weight/bias`` and the
BatchNorm's ``features.{i+1}.weight/bias/running_mean/running_var/num_batches_tracked``. So the work is split:

* ``ConvBNReLU2d`` / ``ConvBNReLUPool2d`` (at the conv's slot; each IS an ``nn.Conv2d``) compute the whole run. They
  refer to the BatchNorm without registering it (no duplicate keys, no second copy under ``.to()``/``deepcopy``).
* ``FusedBatchNorm2d`` (at the BatchNorm's slot; an ``nn.BatchNorm2d``) owns the BatchNorm's parameters and buffers
  and passes its input through unchanged: the fused conv before it has already applied it.

Forward, with the BatchNorm's ``gamma, beta, eps``:

* batch statistics (training, or ``track_running_stats=False``): ``y = conv(x)`` without the conv bias, then
  ``pool(relu(batch_norm(y)))`` in one op that saves ``y``, the pooled output and one byte per pooled element
  (see ``fastcnn.ops.batch_norm.batch_norm_relu_pool``). The conv bias ``b`` cancels in the normalisation
  (``y + b - mean(y + b) = y - mean(y)``), so it is added only to the batch mean that updates ``running_mean``, and
  its gradient is exactly zero. Running statistics are updated as ``nn.BatchNorm2d`` does (momentum or cumulative
  average, unbiased variance, ``num_batches_tracked``).
* running statistics, nothing needing a gradient (inference): ``y = conv(x)`` without the bias, then BatchNorm (and
  the conv bias) as the per-channel affine map ``y * s + t`` with ``s = gamma / sqrt(running_var + eps)``,
  ``t = beta + (b - running_mean) * s``, in one pass with the ReLU, then the pool. ``s`` and ``t`` (C values) are
  computed from the live tensors at every forward: nothing derived is cached, so no state change can leave them
  stale. Where the convolution is fastcnn's CPU Winograd (`winograd_runs`), which transforms the filters at every
  call anyway, ``s`` is folded into them instead (``conv(x, W) * s + t = conv(x, W * s) + t``, at every forward)
  and the block is one fused ``conv2d_relu_pool`` call, a 2x2 max pool taken in Winograd's output transform.
* running statistics with trainable parameters (e.g. fine-tuning with frozen statistics): the stock ops, whose
  gradients through the unfolded weights keep full precision.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import functional
from ..ops import pair
from ..ops._dispatch import CPU_RESULTS, STOCK, ModuleRoutes, Route, module_runs_stock, stock_routable
from ..ops.batch_norm import batch_norm_relu_pool, scale_shift_add_relu
from ..ops.conv2d import conv2d, winograd_runs
from ..ops.conv_relu_pool import conv_output_elements
from ..ops.conv_relu_pool.reference import relu_pool
from ._batch_norm_fusion import running_scale_shift, update_running_statistics, uses_batch_statistics
from .conv import _FusedConv2d, pool_module_options, pool_options
from .unfused import in_stock_slot

SMALL_OUTPUT = 1 << 18  # N * C_out * H * W below which a fused conv-BN call is "small"

# CPU, fp32, stock / fastcnn in paired rounds: small blocks lose to the fused chain's fixed cost per call - VGG-16's
# conv-BN blocks 2-5 at batch 1 and a quarter of the resolution (8k-100k output elements) 0.85-0.88x inference,
# 0.87-0.93x training - unless their convolution is Winograd's: block1 there (1x64x56x56, 200k output elements, 784
# tiles) 1.18x / 1.09x, routed so 1.21x / 1.11x (conv_bn_block_quick.json). Batch 2 channels_last, blocks 1-5
# (Winograd's convolution, and its weight gradient from 128 channels) 1.28-1.82x inference, 1.35-1.57x training
# (conv_bn_block.json). So below SMALL_OUTPUT, where the convolution is not Winograd's, the block runs its stock
# layers.
ROUTES = ModuleRoutes("conv-BN block", [
    Route(STOCK, measured=f"{CPU_RESULTS}_conv_bn_block_quick.json#block2-block5", device="cpu",
          dtypes=(torch.float32,), size="small"),
])


def _size_class(input, weight, stride, padding, dilation, groups):
    if winograd_runs(input, weight, stride, padding, dilation, groups):
        return "winograd"
    return "small" if conv_output_elements(input, weight) < SMALL_OUTPUT else "large"


class FusedBatchNorm2d(nn.BatchNorm2d):
    """The state of a BatchNorm2d applied by the ``ConvBNReLU2d``/``ConvBNReLUPool2d`` just before it.

    Constructor, parameters, buffers, init and state_dict keys are ``nn.BatchNorm2d``'s; ``forward`` returns its
    input unchanged (or applies the BatchNorm, when its ``FusedSequential`` runs slot by slot).

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as ``nn.BatchNorm2d``.

    Shape:
        input ``(N, C, H, W)``; output: the input itself.

    Example:
        >>> norm = fastcnn.nn.FusedBatchNorm2d(16)
        >>> block = nn.Sequential(fastcnn.nn.ConvBNReLU2d(3, 16, 3, padding=1, batch_norm=norm), norm)
        >>> block(torch.randn(2, 3, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
    """

    def forward(self, input):
        return super().forward(input) if in_stock_slot() else input

    @classmethod
    def from_batch_norm(cls, batch_norm):
        """A FusedBatchNorm2d holding ``batch_norm``'s hyperparameters, training mode and very tensors (so its
        state_dict, and an optimizer's references to its parameters, carry over)."""
        if type(batch_norm) is not nn.BatchNorm2d:
            raise TypeError(f"fastcnn: batch_norm must be an nn.BatchNorm2d, got {type(batch_norm).__name__}")
        held = cls(batch_norm.num_features, batch_norm.eps, batch_norm.momentum, batch_norm.affine,
                   batch_norm.track_running_stats, device="meta")
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            if getattr(batch_norm, name) is not None:
                setattr(held, name, getattr(batch_norm, name))
        return held.train(batch_norm.training)


class _ConvBatchNormReLU(_FusedConv2d):
    """Shared forward of the two fused classes; subclasses say which pool follows (``_pool_arguments``)."""

    def _bind(self, batch_norm):
        if not isinstance(batch_norm, FusedBatchNorm2d):
            raise TypeError("fastcnn: batch_norm must be a fastcnn.nn.FusedBatchNorm2d (placed right after this "
                            f"module), got {type(batch_norm).__name__}")
        if batch_norm.num_features != self.out_channels:
            raise ValueError(f"fastcnn: batch_norm has {batch_norm.num_features} features but the convolution has "
                             f"{self.out_channels} output channels")
        self.__dict__["batch_norm"] = batch_norm  # referred to, not registered: its state lives in its own slot

    def _pool_arguments(self):
        raise NotImplementedError

    def _route_says_stock(self, input, _):
        """Whether the block's route sends this call to its stock layers (remembered per input signature by
        `module_runs_stock`)."""
        return stock_routable(input) and ROUTES.runs_stock(
            input, size=_size_class(input, self.weight, self.stride, self._op_padding(), self.dilation, self.groups))

    def forward(self, input):
        if in_stock_slot():
            return super().forward(input)  # nn.Conv2d's: the BatchNorm, ReLU and pool slots apply the rest
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")  # nn.BatchNorm2d's message
        norm = self.batch_norm
        if module_runs_stock(self, input, None, self._route_says_stock):  # stock's layers
            return relu_pool(nn.BatchNorm2d.forward(norm, super().forward(input)), *self._pool_arguments())
        input, padding = self._fused_conv_args(input)
        conv_args = (self.stride, padding, self.dilation, self.groups)
        if uses_batch_statistics(norm):
            y = conv2d(input, self.weight, *conv_args)
            out, mean, var = batch_norm_relu_pool(y, self.bias, norm.weight, norm.bias, norm.eps,
                                                  *self._pool_arguments())
            update_running_statistics(norm, mean, var, y.numel() // y.shape[1])
            return out
        if torch.is_grad_enabled() and any(p.requires_grad for p in (*self.parameters(), *norm.parameters())):
            return self._stock_forward(input, conv_args)
        scale, shift = running_scale_shift(norm, input.dtype)
        if self.bias is not None:
            shift = shift + self.bias.to(shift.dtype) * scale
        if self._folds_batch_norm(input, padding):
            # conv(x, W) * s + t = conv(x, W * s) + t: one fused call (a 2x2 max pool taken in Winograd's output
            # transform) instead of three passes over the convolution output.
            folded = self.weight * scale.to(self.weight.dtype).view(-1, 1, 1, 1)
            return functional.conv2d_relu_pool(input, folded, shift.to(input.dtype), *conv_args,
                                               *self._pool_arguments())
        y = conv2d(input, self.weight, *conv_args)
        return self._pool(scale_shift_add_relu(y, scale, shift))

    def _folds_batch_norm(self, input, padding):
        """Whether inference folds the BatchNorm's scale into the filters: where the convolution is Winograd's
        (which transforms the filters at every call anyway) and the filters are smaller than the convolution output
        whose passes the fold saves. CPU, batch 2, VGG-16-BN blocks against stock eager (conv_bn_block.json): blocks
        1-3 (weights 0.6-37% of the output) run 1.4-1.8x folded; block4's 512x512 filters (2.9x its output) cost
        more to fold than the passes save (0.85x folded, 1.3x not). With a 2x2 max pool the fused call runs
        Winograd on NCHW input too (csrc/conv_relu_pool.cpp)."""
        max_pool_2x2 = self._pool_arguments() == ("max", (2, 2), (2, 2))
        return (not isinstance(padding, str)
                and self.weight.numel() <= conv_output_elements(input, self.weight)
                and winograd_runs(input, self.weight, self.stride, pair(padding, "padding", 0), self.dilation,
                                  self.groups, any_layout=max_pool_2x2))

    def _stock_forward(self, input, conv_args):
        norm = self.batch_norm
        y = F.conv2d(input, self.weight, self.bias, *conv_args)
        return self._pool(F.relu(F.batch_norm(y, norm.running_mean, norm.running_var, norm.weight, norm.bias, False,
                                              0.0, norm.eps)))

    def _pool(self, out):
        pool, size, stride = self._pool_arguments()
        if pool == "max":
            return F.max_pool2d(out, size, stride)
        return F.avg_pool2d(out, size, stride) if pool == "avg" else out


def fused_batch_norm_of(layer):
    """The FusedBatchNorm2d that ``layer`` applies, if it is a ConvBNReLU2d or ConvBNReLUPool2d; else None."""
    return layer.batch_norm if isinstance(layer, _ConvBatchNormReLU) else None


class ConvBNReLU2d(_ConvBatchNormReLU):
    """``Conv2d -> BatchNorm2d -> ReLU`` in fused ops, with the BatchNorm held by the ``FusedBatchNorm2d`` that must
    follow it in the sequence. Arguments, init and state_dict (``weight``, ``bias``) exactly as ``nn.Conv2d``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device,
        dtype: as ``nn.Conv2d``.
        batch_norm: the ``FusedBatchNorm2d`` of ``out_channels`` features whose normalisation this module applies
            (keyword only).

    Shape:
        input ``(N, C_in, H, W)``; output as ``nn.Conv2d``'s.

    Example:
        >>> norm = fastcnn.nn.FusedBatchNorm2d(16)
        >>> layers = nn.Sequential(fastcnn.nn.ConvBNReLU2d(3, 16, 3, padding=1, batch_norm=norm), norm)
        >>> layers(torch.randn(4, 3, 32, 32)).shape
        torch.Size([4, 16, 32, 32])
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, *, batch_norm):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._bind(batch_norm)

    def _pool_arguments(self):
        return "none", (1, 1), (1, 1)

    @classmethod
    def from_modules(cls, conv, batch_norm, relu):
        """``(fused, held_batch_norm)`` computing ``nn.Sequential(conv, batch_norm, relu)`` when placed in the conv's
        and the BatchNorm's slots; both share the given modules' tensors."""
        cls._check_relu(relu)
        held = FusedBatchNorm2d.from_batch_norm(batch_norm)
        return cls._from_conv(conv, batch_norm=held).train(conv.training), held


class ConvBNReLUPool2d(_ConvBatchNormReLU):
    """``Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d/AvgPool2d`` in fused ops, saving for backward the conv output,
    the pooled output and one byte per pooled element. The BatchNorm is held by the ``FusedBatchNorm2d`` that must
    follow it in the sequence. Arguments, init and state_dict (``weight``, ``bias``) exactly as ``nn.Conv2d``.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device,
        dtype: as ``nn.Conv2d``.
        pool: ``"max"`` (default) or ``"avg"``.
        pool_size: pooling window (default 2).
        pool_stride: pooling stride (default: ``pool_size``). Floor mode, no pool padding.
        batch_norm: the ``FusedBatchNorm2d`` of ``out_channels`` features whose normalisation this module applies
            (keyword only).

    Shape:
        input ``(N, C_in, H, W)``; output ``(N, C_out, H_p, W_p)`` with
        ``H_p = (H_conv - pool_size) // pool_stride + 1``.

    Example:
        >>> norm = fastcnn.nn.FusedBatchNorm2d(64)
        >>> block = nn.Sequential(fastcnn.nn.ConvBNReLUPool2d(3, 64, 3, padding=1, batch_norm=norm), norm)
        >>> block(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 64, 16, 16])
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None, pool="max", pool_size=2,
                 pool_stride=None, *, batch_norm):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.pool, self.pool_size, self.pool_stride = pool_options(pool, pool_size, pool_stride)
        self._bind(batch_norm)

    def _pool_arguments(self):
        return self.pool, self.pool_size, self.pool_stride

    def extra_repr(self):
        return f"{super().extra_repr()}, pool={self.pool!r}, pool_size={self.pool_size}, pool_stride={self.pool_stride}"

    @classmethod
    def from_modules(cls, conv, batch_norm, relu, pool):
        """``(fused, held_batch_norm)`` computing ``nn.Sequential(conv, batch_norm, relu, pool)`` when placed in the
        conv's and the BatchNorm's slots; both share the given modules' tensors. ``pool`` as for
        ``ConvReLUPool2d.from_modules``."""
        cls._check_relu(relu)
        options = pool_module_options(pool)
        held = FusedBatchNorm2d.from_batch_norm(batch_norm)
        return cls._from_conv(conv, batch_norm=held, **options).train(conv.training), held
