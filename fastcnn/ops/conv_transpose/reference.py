"""Plain-PyTorch ConvTranspose2d + bias + activation: the test oracle, the last-resort backend, and the documented
stride-phase decomposition that the compiled kernels follow.

A transposed convolution scatters every input pixel through the kernel. Along one spatial axis, with stride ``s``,
padding ``p``, dilation ``d`` and kernel ``k``, input row ``iy`` and tap ``ky`` land on output row

    oy = iy * s - p + ky * d,        0 <= oy < OH,  OH = (H - 1) s - 2p + d (k - 1) + output_padding + 1.

Read the other way round (a gather, which needs no atomics): output row ``oy`` receives tap ``ky`` exactly when
``oy + p - ky * d`` is a non-negative multiple of ``s`` below ``H * s``, from ``iy = (oy + p - ky * d) / s``. So the
output rows split into ``s`` *phases* by ``r = (oy + p) mod s``, and phase ``r`` is touched only by the taps with
``ky * d = r (mod s)``. Inside one phase the rows are ``oy = r - p + s * t`` and tap ``ky = r + s * m`` (writing
``ky * d = r + s * m``) reads ``iy = t - m``: an ordinary stride-1 correlation with a sub-kernel of about ``k / s``
taps. Running the ``s_h * s_w`` phases computes every output once and multiplies no inserted zero.

Two cases make this concrete:

* ``k == s`` (dilation 1), e.g. the 2x2 stride-2 U-Net upsampling: every phase has exactly one tap, so the whole
  layer is one GEMM ``[N*H*W, C_in] x [C_in, k*k*C_out]`` whose columns are "pixel-shuffled" into place.
* ``k = 4, s = 2, p = 1``: four phases, each a 2x2 convolution.

``activation`` is ``"none"`` or ``"relu"``; the ReLU keeps NaN, as ``F.relu`` does.
"""
import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "relu")


def conv_transpose2d_act(x, weight, bias, stride, padding, output_padding, groups, dilation, activation):
    """``act(conv_transpose2d(x, weight, bias, ...))`` with stock PyTorch ops; differentiable by autograd. The ReLU
    runs in place on the convolution's fresh output (whose backward does not read it), as ``nn.ReLU(inplace=True)``
    does after a layer: one allocation and one pass over memory fewer."""
    y = F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)
    return F.relu(y, inplace=True) if activation == "relu" else y


def output_size(size, kernel, stride, padding, output_padding, dilation):
    """``(H - 1) s - 2p + d (k - 1) + output_padding + 1`` per spatial axis."""
    return tuple((size[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + output_padding[i] + 1
                 for i in range(2))


def phase_taps(kernel, stride, padding, dilation, phase):
    """Taps of one axis that reach the output rows ``oy`` with ``(oy + padding) mod stride == phase``, each with its
    input row shift: ``[(ky, m)]`` where tap ``ky`` reads ``iy = t - m`` for output row ``oy = phase - padding + s t``.
    """
    return [(k, (k * dilation - phase) // stride) for k in range(kernel) if (k * dilation - phase) % stride == 0]


def conv_transpose2d_by_phases(x, weight, bias, stride, padding, output_padding, groups, dilation, activation):
    """The same result computed phase by phase (no zero insertion), in plain PyTorch: the math the kernels follow.

    For each phase (rh, rw), each of its taps (ky, mh) x (kx, mw) adds ``x[t - mh, u - mw] @ weight[:, :, ky, kx]``
    to the output pixels ``(rh - p_h + s_h t, rw - p_w + s_w u)``; input rows outside ``[0, H)`` contribute zero.
    """
    n, c_in, h, w = x.shape
    c_out_g, (kh, kw) = weight.shape[1], weight.shape[2:]
    oh, ow = output_size((h, w), (kh, kw), stride, padding, output_padding, dilation)
    c_in_g = c_in // groups
    out = x.new_zeros(n, c_out_g * groups, oh, ow)
    for rh in range(stride[0]):
        rows = torch.arange((rh - padding[0]) % stride[0], oh, stride[0])  # output rows of this phase
        t = (rows + padding[0] - rh) // stride[0]
        for rw in range(stride[1]):
            cols = torch.arange((rw - padding[1]) % stride[1], ow, stride[1])
            u = (cols + padding[1] - rw) // stride[1]
            acc = x.new_zeros(n, c_out_g * groups, len(rows), len(cols))
            for ky, mh in phase_taps(kh, stride[0], padding[0], dilation[0], rh):
                iy = t - mh
                ok_y = (iy >= 0) & (iy < h)
                for kx, mw in phase_taps(kw, stride[1], padding[1], dilation[1], rw):
                    ix = u - mw
                    ok_x = (ix >= 0) & (ix < w)
                    patch = x[:, :, iy.clamp(0, h - 1)][:, :, :, ix.clamp(0, w - 1)]
                    patch = patch * (ok_y[:, None] & ok_x[None, :]).to(x.dtype)
                    for g in range(groups):
                        xs = patch[:, g * c_in_g:(g + 1) * c_in_g]
                        wt = weight[g * c_in_g:(g + 1) * c_in_g, :, ky, kx]  # [C_in_g, C_out_g]
                        acc[:, g * c_out_g:(g + 1) * c_out_g] += torch.einsum("nchw,co->nohw", xs, wt)
            out[:, :, rows[:, None], cols[None, :]] = acc
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return F.relu(out) if activation == "relu" else out
