"""User-facing argument checks of the fused transposed convolution: every backend sees only inputs that passed here,
and a bad input gets an error naming the argument and what was expected (PyTorch's own rules, clearer words)."""

from ..reference.conv_transpose import ACTIVATIONS, output_size
from ._args import check_float_tensors, pair


def check_conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation, activation):
    """Validates one call; returns the normalized (stride, padding, output_padding, dilation, activation)."""
    check_float_tensors(input=input, weight=weight)
    if input.dim() != 4:
        raise ValueError(f"fastcnn: input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"fastcnn: weight must be 4-D (C_in, C_out / groups, kH, kW), got shape "
                         f"{tuple(weight.shape)}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"fastcnn: groups must be a positive int, got {groups!r}")
    if weight.shape[0] % groups != 0:
        raise ValueError(f"fastcnn: weight's {weight.shape[0]} input channels are not divisible by groups={groups}")
    if input.shape[1] != weight.shape[0]:
        raise ValueError(f"fastcnn: input has {input.shape[1]} channels, but weight of shape {tuple(weight.shape)} "
                         f"expects {weight.shape[0]}")
    c_out = weight.shape[1] * groups
    for name, t in [("weight", weight)] + ([("bias", bias)] if bias is not None else []):
        if t.device != input.device:
            raise ValueError(f"fastcnn: {name} is on {t.device} but input is on {input.device}")
        if t.dtype != input.dtype:
            raise TypeError(f"fastcnn: {name} has dtype {t.dtype} but input has dtype {input.dtype}")
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"fastcnn: bias must have shape ({c_out},), got {tuple(bias.shape)}")
    stride, padding = pair(stride, "stride", 1), pair(padding, "padding", 0)
    dilation, output_padding = pair(dilation, "dilation", 1), pair(output_padding, "output_padding", 0)
    for i in range(2):
        if output_padding[i] >= max(stride[i], dilation[i]):
            raise ValueError(f"fastcnn: output_padding {output_padding} must be smaller than stride {stride} or "
                             f"dilation {dilation} in each dimension")
    size = output_size(input.shape[2:], weight.shape[2:], stride, padding, output_padding, dilation)
    if min(size) < 1:
        raise ValueError(f"fastcnn: input of spatial size {tuple(input.shape[2:])} gives an empty output {size}: "
                         f"padding {padding} is too large for kernel {tuple(weight.shape[2:])}")
    activation = "none" if activation is None else activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"fastcnn: activation must be None, 'none' or 'relu', got {activation!r}")
    return stride, padding, output_padding, dilation, activation

