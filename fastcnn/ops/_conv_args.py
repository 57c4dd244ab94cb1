"""User-facing argument checks for the fused convolution ops: every backend sees only inputs that passed here, and a
bad input gets an error naming the argument and what was expected."""
import torch

from ..reference.conv_relu_pool import POOLS

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def pair(value, name, minimum):
    """An int or a pair of ints -> a 2-tuple of ints, each >= minimum."""
    values = (value, value) if isinstance(value, int) else tuple(value)
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"fastcnn: {name} must be an int or a pair of ints, got {value!r}")
    if min(values) < minimum:
        raise ValueError(f"fastcnn: {name} must be >= {minimum}, got {value!r}")
    return values


def conv_output_size(size, kernel, stride, padding, dilation):
    """floor((size + 2p - d(k - 1) - 1) / s) + 1, per spatial axis."""
    return tuple((size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2))


def check_float_tensors(**tensors):
    """Each named argument must be a Tensor of a floating dtype fastcnn supports."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastcnn: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"fastcnn: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def check_conv_relu_pool(input, weight, bias, stride, padding, dilation, groups, pool, pool_size, pool_stride):
    """Validates one call; returns the normalized (stride, padding, dilation, pool_size, pool_stride)."""
    check_float_tensors(input=input, weight=weight)
    if input.dim() != 4:
        raise ValueError(f"fastcnn: input must be 4-D (N, C, H, W), got a {input.dim()}-D tensor of shape "
                         f"{tuple(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"fastcnn: weight must be 4-D (C_out, C_in / groups, kH, kW), got shape {tuple(weight.shape)}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"fastcnn: groups must be a positive int, got {groups!r}")
    if weight.shape[0] % groups != 0:
        raise ValueError(f"fastcnn: weight's {weight.shape[0]} output channels are not divisible by groups={groups}")
    if input.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"fastcnn: input has {input.shape[1]} channels, but weight of shape {tuple(weight.shape)} "
                         f"with groups={groups} expects {weight.shape[1] * groups}")
    tensors = [("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    for name, t in tensors:
        if t.device != input.device:
            raise ValueError(f"fastcnn: {name} is on {t.device} but input is on {input.device}")
        if t.dtype != input.dtype:
            raise TypeError(f"fastcnn: {name} has dtype {t.dtype} but input has dtype {input.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"fastcnn: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    stride, padding, dilation = pair(stride, "stride", 1), pair(padding, "padding", 0), pair(dilation, "dilation", 1)
    conv_size = conv_output_size(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    if min(conv_size) < 1:
        raise ValueError(f"fastcnn: input of spatial size {tuple(input.shape[2:])} with padding {padding} is smaller "
                         f"than the kernel {tuple(weight.shape[2:])} with dilation {dilation}")
    if pool not in POOLS:
        raise ValueError(f"fastcnn: pool must be one of {POOLS}, got {pool!r}")
    if pool == "none":
        return stride, padding, dilation, (1, 1), (1, 1)
    pool_size = pair(pool_size, "pool_size", 1)
    pool_stride = pool_size if pool_stride is None else pair(pool_stride, "pool_stride", 1)
    area, limit = pool_size[0] * pool_size[1], 256 if pool == "max" else 8
    if area > limit:
        raise ValueError(f"fastcnn: {pool} pooling supports windows of at most {limit} elements, got pool_size "
                         f"{pool_size}")
    if conv_size[0] < pool_size[0] or conv_size[1] < pool_size[1]:
        raise ValueError(f"fastcnn: the convolution output {conv_size} is smaller than pool_size {pool_size}")
    return stride, padding, dilation, pool_size, pool_stride
