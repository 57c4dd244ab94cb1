"""User-facing argument checks shared by the ops: every backend sees only inputs that passed, and a bad input gets
an error naming the argument and what was expected."""
import torch

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


def check_same_device_and_dtype(input, **tensors):
    """Each named tensor (None: skipped) must be on input's device, in input's dtype."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device != input.device:
            raise ValueError(f"fastcnn: {name} is on {t.device} but input is on {input.device}")
        if t.dtype != input.dtype:
            raise TypeError(f"fastcnn: {name} has dtype {t.dtype} but input has dtype {input.dtype}")
