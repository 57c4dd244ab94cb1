"""Plain-PyTorch Conv2d + bias + ReLU (+ max/avg pool): the test oracle and the last-resort backend.

The fused op returns ``(out, code)``. ``out`` is exactly ``pool(relu(conv2d(x, w, b)))``. ``code`` is the compact
record the backward needs instead of the full-resolution activation, one ``uint8`` per pooled element with the same
shape and memory format as ``out``:

* ``pool="max"``: the offset ``i * kw + j`` of the selected element inside its ``kh x kw`` window. Selection follows
  PyTorch's max-pool exactly: scan the window row-major, replace the running maximum when ``v > best`` or ``v`` is
  NaN. So the first of equal maxima wins and the last NaN wins.
* ``pool="avg"``: a bit field, bit ``i * kw + j`` set when the ReLU input at that window position is not ``<= 0``
  (PyTorch's ReLU backward passes the gradient exactly there, NaN included). Hence at most 8 window elements.
* ``pool="none"``: an empty tensor; the backward reads the ReLU mask from ``out`` itself.

The ReLU mask of a max window needs no bit of its own: the gradient reaches the conv output only at the selected
element, and only when ``not (out <= 0)`` there.
"""
import torch
import torch.nn.functional as F

from .._dispatch import accumulation_dtype, memory_format_of

POOLS = ("none", "max", "avg")


def conv2d_relu_pool(x, weight, bias, stride, padding, dilation, groups, pool, pool_size, pool_stride):
    """``pool(relu(conv2d(x)))`` with stock PyTorch ops; differentiable by autograd."""
    return relu_pool(F.conv2d(x, weight, bias, stride, padding, dilation, groups), pool, pool_size, pool_stride)


def relu_pool(y, pool, pool_size, pool_stride):
    """``pool(relu(y))`` with stock PyTorch ops, for ``y`` a convolution's fresh output: the ReLU runs in place (the
    convolution's backward does not read its output), as ``nn.ReLU(inplace=True)`` does in VGG - one allocation and
    one pass over memory fewer."""
    y = F.relu(y, inplace=True)
    if pool == "max":
        return F.max_pool2d(y, pool_size, pool_stride)
    if pool == "avg":
        return F.avg_pool2d(y, pool_size, pool_stride)
    return y


def _windows(y, pool_size, pool_stride):
    """``[N, C, PH, PW, kh * kw]`` view of every pooling window of ``y``, window elements in row-major order."""
    (kh, kw), (sh, sw) = pool_size, pool_stride
    win = y.unfold(2, kh, sh).unfold(3, kw, sw)
    return win.reshape(*win.shape[:4], kh * kw)


def bias_relu_pool(conv, bias, pool, pool_size, pool_stride, scale=None):
    """The fused epilogue on a precomputed convolution output, ``pool(relu(conv * scale + bias))`` (scale None: 1,
    bias None: 0) with ``conv * scale + bias`` computed in float32 (float64 for float64) and rounded to conv's dtype
    once: ``(out, code)`` as described in the module doc."""
    acc = accumulation_dtype(conv.dtype)
    y = conv.to(acc)
    if scale is not None:
        y = y * scale.to(acc).view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.to(acc).view(1, -1, 1, 1)
    y = F.relu(y.to(conv.dtype))
    if pool == "none":
        return y, y.new_empty(0, dtype=torch.uint8)
    win = _windows(y, pool_size, pool_stride)
    fmt = memory_format_of(conv)
    if pool == "max":
        best, code = win[..., 0], torch.zeros(win.shape[:4], dtype=torch.uint8, device=y.device)
        for t in range(1, win.shape[-1]):
            v = win[..., t]
            take = (v > best) | torch.isnan(v)
            best = torch.where(take, v, best)
            code = torch.where(take, torch.full_like(code, t), code)
        out = best
    else:
        out = F.avg_pool2d(y, pool_size, pool_stride)
        passes = ~(win <= 0)
        weights = 2 ** torch.arange(win.shape[-1], device=y.device, dtype=torch.int32)
        code = (passes.to(torch.int32) * weights).sum(-1).to(torch.uint8)
    return out.contiguous(memory_format=fmt), code.contiguous(memory_format=fmt)


def bias_relu_pool_backward(grad_out, out, code, conv_size, pool, pool_size, pool_stride):
    """Gradient w.r.t. the convolution output (before bias), rebuilt from the pooled gradient and ``code``."""
    if pool == "none":
        return torch.where(out <= 0, torch.zeros_like(grad_out), grad_out)
    (kh, kw), (sh, sw) = pool_size, pool_stride
    n, c, ph, pw = grad_out.shape
    grad_conv = grad_out.new_zeros(n, c, *conv_size)
    if pool == "max":
        grad = torch.where(out <= 0, torch.zeros_like(grad_out), grad_out)
    else:
        grad = grad_out / (kh * kw)
    for i in range(kh):
        for j in range(kw):
            t = i * kw + j
            if pool == "max":
                hit = code == t
            else:
                hit = (code.to(torch.int32) >> t) & 1 == 1
            rows = slice(i, i + sh * (ph - 1) + 1, sh)
            cols = slice(j, j + sw * (pw - 1) + 1, sw)
            grad_conv[:, :, rows, cols] += torch.where(hit, grad, torch.zeros_like(grad))
    return grad_conv.contiguous(memory_format=memory_format_of(grad_out))
