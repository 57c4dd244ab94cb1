"""fastcnn's public functions, in the style of torch.nn.functional."""
import torch.nn.functional as F

from .ops import conv_relu_pool as _ops
from .ops import conv_transpose as _transpose_ops


def conv2d_relu_pool(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, pool="max", pool_size=2,
                     pool_stride=None):
    """Fused ``pool(relu(conv2d(input, weight, bias, stride, padding, dilation, groups)))``.

    Equals ``F.max_pool2d(F.relu(F.conv2d(...)), pool_size, pool_stride)`` (or ``F.avg_pool2d``, or no pool) in
    value and gradient, but never writes the full-resolution activation: training saves only the pooled output and
    one byte per pooled element.

    Args:
        input: ``(N, C_in, H, W)`` or unbatched ``(C_in, H, W)``; float32, float16, bfloat16 or float64; contiguous
            or channels_last.
        weight: ``(C_out, C_in / groups, kH, kW)``, same dtype and device as ``input``.
        bias: optional ``(C_out,)``.
        stride, padding, dilation, groups: as in ``F.conv2d`` (``padding`` may be ``"valid"`` or ``"same"``).
        pool: ``"max"``, ``"avg"`` or ``"none"``.
        pool_size: pooling window, an int or a pair (max: at most 256 elements; avg: at most 8).
        pool_stride: pooling stride; ``None`` means ``pool_size``. Floor mode, no pool padding.

    Shape:
        output ``(N, C_out, H_p, W_p)`` with ``H_c = (H + 2p - d(kH - 1) - 1) // s + 1`` for the convolution and
        ``H_p = (H_c - pool_size) // pool_stride + 1`` after the pool; in ``input``'s memory format.

    Example:
        >>> x, w, b = torch.randn(8, 3, 32, 32), torch.randn(16, 3, 3, 3), torch.randn(16)
        >>> fastcnn.functional.conv2d_relu_pool(x, w, b, padding=1).shape
        torch.Size([8, 16, 16, 16])
    """
    if input.dim() == 3:  # unbatched, as F.conv2d allows
        return conv2d_relu_pool(input.unsqueeze(0), weight, bias, stride, padding, dilation, groups, pool,
                                pool_size, pool_stride).squeeze(0)
    if isinstance(padding, str):
        input, padding = _resolve_string_padding(input, weight, padding, stride, dilation)
    return _ops.conv2d_relu_pool(input, weight, bias, stride, padding, dilation, groups, pool, pool_size,
                                 pool_stride)


def conv2d_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Fused ``relu(conv2d(input, weight, bias, ...))``; arguments and shapes as ``F.conv2d``.

    Example:
        >>> fastcnn.functional.conv2d_relu(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)).shape
        torch.Size([2, 4, 6, 6])
    """
    return conv2d_relu_pool(input, weight, bias, stride, padding, dilation, groups, pool="none")


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
                     activation=None):
    """Fused ``act(F.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation))``.

    Computed by stride-phase decomposition (no zero insertion; kernel == stride is one GEMM with a pixel-shuffle
    store) with the bias and activation in the epilogue; equals the stock ops in value and gradient.

    Args:
        input: ``(N, C_in, H, W)`` or unbatched ``(C_in, H, W)``; float32, float16, bfloat16 or float64.
        weight: ``(C_in, C_out / groups, kH, kW)``. bias: optional ``(C_out,)``.
        stride, padding, output_padding, groups, dilation: as ``F.conv_transpose2d`` (output_padding must be
            smaller than stride or dilation).
        activation: ``None`` or ``"relu"``.

    Shape:
        output ``(N, C_out, H_out, W_out)``, ``H_out = (H - 1) s - 2p + d (kH - 1) + output_padding + 1``, in
        ``input``'s memory format.

    Example:
        >>> x, w = torch.randn(2, 8, 7, 7), torch.randn(8, 4, 4, 4)
        >>> fastcnn.functional.conv_transpose2d(x, w, stride=2, padding=1, activation="relu").shape
        torch.Size([2, 4, 14, 14])
    """
    if input.dim() == 3:  # unbatched, as F.conv_transpose2d allows
        return conv_transpose2d(input.unsqueeze(0), weight, bias, stride, padding, output_padding, groups, dilation,
                                activation).squeeze(0)
    return _transpose_ops.conv_transpose2d_act(input, weight, bias, stride, padding, output_padding, groups,
                                               dilation, activation)

def _resolve_string_padding(input, weight, padding, stride, dilation):
    """``"valid"`` -> 0; ``"same"`` -> the symmetric padding F.conv2d uses, with its extra row/column on the
    bottom/right when the total is odd (applied here with F.pad)."""
    if padding == "valid":
        return input, 0
    if padding != "same":
        raise ValueError(f"fastcnn: padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    if stride not in (1, (1, 1), [1, 1]):
        raise ValueError("fastcnn: padding='same' is not supported for strided convolutions")
    dilation = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    total = [dilation[i] * (weight.shape[2 + i] - 1) for i in range(2)]
    extra_h, extra_w = total[0] % 2, total[1] % 2
    if extra_h or extra_w:
        input = F.pad(input, (0, extra_w, 0, extra_h))
    return input, (total[0] // 2, total[1] // 2)
