"""Drop-in fused transposed convolution: IS an ``nn.ConvTranspose2d`` (same constructor, defaults, init, parameters
and state_dict keys ``weight``/``bias``) whose forward also applies the activation in the same kernel's epilogue."""
import torch.nn as nn
import torch.nn.functional as F

from .. import functional
from ..ops._dispatch import module_runs_stock
from ..ops.conv_transpose import ACTIVATIONS, call_mode, runs_stock


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` followed by an optional ReLU, in one op.

    Kernels decompose the layer by stride phase (no zero insertion): kernel == stride (the 2x2 stride-2 U-Net
    upsampling) is one GEMM with a pixel-shuffle store, and the bias and activation are fused into the epilogue.
    Where the op's route sends a call to stock PyTorch (small calls on CPU), the module runs as
    ``nn.ConvTranspose2d`` and an in-place ReLU.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias, dilation,
        padding_mode, device, dtype: as ``nn.ConvTranspose2d`` (``padding_mode`` must be ``"zeros"``, as there).
        activation: ``None`` (default; exactly ``nn.ConvTranspose2d``) or ``"relu"``.

    Shape:
        input ``(N, C_in, H, W)`` or ``(C_in, H, W)``; output ``(N, C_out, H_out, W_out)`` with
        ``H_out = (H - 1) stride - 2 padding + dilation (kH - 1) + output_padding + 1``. ``forward(input,
        output_size)`` picks output_padding from a requested size, as ``nn.ConvTranspose2d`` does.

    Example:
        >>> up = fastcnn.nn.ConvTranspose2d(64, 32, 2, stride=2, activation="relu")
        >>> up(torch.randn(1, 64, 14, 14)).shape
        torch.Size([1, 32, 28, 28])
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, padding_mode="zeros", device=None, dtype=None, activation=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                         dilation, padding_mode, device, dtype)
        if activation not in (None,) + ACTIVATIONS:
            raise ValueError(f"fastcnn: activation must be None, 'none' or 'relu', got {activation!r}")
        self.activation = None if activation == "none" else activation

    def forward(self, input, output_size=None):
        # The route reads the call's mode (whether autograd records it) besides the input: remembered per both. The
        # parameters are read from _parameters, where nn.Module.__getattr__ finds them, without that Python call
        # (~10 us a name with the caches evicted, on every call).
        params = self._parameters
        if module_runs_stock(self, input, call_mode(input, params["weight"], params["bias"]), self._route_says_stock):
            out = super().forward(input, output_size)
            return out if self.activation is None else F.relu(out, inplace=True)
        if self.padding_mode != "zeros":
            raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size, 2,
                                              self.dilation)
        return functional.conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding, output_padding,
                                           self.groups, self.dilation, self.activation)

    def _route_says_stock(self, input, _):
        """Whether the op's route sends this call to stock (remembered per input signature by
        `module_runs_stock`)."""
        return runs_stock(input, self.weight, self.bias, self.stride, self.groups)

    def extra_repr(self):
        return super().extra_repr() + ("" if self.activation is None else f", activation={self.activation!r}")

    @classmethod
    def from_modules(cls, conv, relu=None):
        """The fused equivalent of ``conv`` (or ``nn.Sequential(conv, relu)``), sharing conv's Parameters."""
        if type(conv) is not nn.ConvTranspose2d:
            raise TypeError(f"fastcnn: conv must be an nn.ConvTranspose2d, got {type(conv).__name__}")
        if relu is not None and not isinstance(relu, nn.ReLU):
            raise TypeError(f"fastcnn: relu must be an nn.ReLU, got {type(relu).__name__}")
        fused = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.output_padding, conv.groups, conv.bias is not None, conv.dilation, conv.padding_mode,
                    device="meta", activation=None if relu is None else "relu")
        fused.weight, fused.bias = conv.weight, conv.bias
        return fused
