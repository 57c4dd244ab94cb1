"""ConvTranspose2d + bias + activation, forward and backward. The math is derived in
``fastcnn.ops.conv_transpose.reference``.

Forward: by stride-phase decomposition, one launch, the phase on a grid axis, every multiply a real one (no zero
insertion, no col2im). Backward: the ReLU mask is applied on the operand loads (no masked copy of the gradient in
memory).

With y = act(conv_transpose2d(x, w) + b) and dy_m = dy where not (y <= 0) for the ReLU (dy itself without one), and
output row oy = iy*s - p + ky*d for input row iy and tap ky (likewise in x):

  * the input gradient is an ordinary strided convolution of dy_m (every multiply a real one, no zero insertion):
        dx[n, g*Cig + ci, iy, ix] = sum_{co < Cog, ky, kx} dy_m[n, g*Cog + co, oy, ox] * w[g*Cig + ci, co, ky, kx]
  * the weight gradient swaps roles, reducing over the input pixels:
        dw[g*Cig + ci, co, ky, kx] = sum_{n, iy, ix} x[n, g*Cig + ci, iy, ix] * dy_m[n, g*Cog + co, oy, ox]
  * db[c] = sum_{n, oy, ox} dy_m[n, c, oy, ox].
Output rows and columns outside [0, OH) x [0, OW) contribute zero. The weight and bias reductions run in fixed
splits whose fp32 partials are added in split order (``_conv_common._split_sum``): deterministic, no atomics.
"""
import math

import torch
import triton
import triton.language as tl

from ._conv_common import (POOL_IDS, _dbias_kernel, _load_kn, _load_pixels, _mma, _pixel_tile, _split_sum, _store_tile,
                           _tap_channels, _tile_of, _wgrad_program, check_grid, dot_flags, gemm_blocks, identity,
                           split_count)

_ACT_IDS = {"none": 0, "relu": 1}

# ---------------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _first_tap(a, PAD: tl.constexpr, ST: tl.constexpr, DIL: tl.constexpr, K: tl.constexpr):
    # Smallest tap k with (a + PAD - k*DIL) divisible by ST, or K when the phase has no tap (possible when K < ST).
    first = K
    for j in tl.static_range(K):
        k = K - 1 - j
        first = tl.where((a + PAD - k * DIL) % ST == 0, k, first)
    return first


# Program (pid_m, pid_n, pid_z): z = g * ST_H*ST_W + phase, phase (a, b) = the output residues (oy mod ST_H,
# ox mod ST_W). Its pixels are oy = a + ST_H*t, ox = b + ST_W*u for t < cdiv(OH - a, ST_H), u < cdiv(OW - b, ST_W).
# The taps reaching them are ky = ky0 + i*STEP_H (STEP_H = ST_H / gcd(ST_H, DIL_H)), i.e. exactly those with
# (a + PAD_H - ky*DIL_H) = 0 mod ST_H, each reading input row iy = t + (a + PAD_H - ky*DIL_H) / ST_H (likewise in x):
#   y[n, g*Cog + co, oy, ox] = b[co]
#       + sum_{ky, kx of the phase; ci < Cig} x[n, g*Cig + ci, iy, ix] * w[g*Cig + ci, co, ky, kx],
# one [BLOCK_M pixels, BLOCK_K in-ch] x [BLOCK_K, BLOCK_N out-ch] MMA per (tap, channel tile), fp32 accumulation,
# rows outside the input read zero. Epilogue: + bias, round to the output dtype, ReLU keeping NaN (ACT == 1).
@triton.jit
def _conv_transpose_forward_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    N_IMG, H, W, OH, OW, CIG, COG,
    sx_n, sx_c, sx_h, sx_w,
    sw_i, sw_o, sw_h, sw_w,
    so_n, so_c, so_h, so_w,
    ST_H: tl.constexpr, ST_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    STEP_H: tl.constexpr, STEP_W: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_z = tl.program_id(2)
    g = pid_z // (ST_H * ST_W)
    a = (pid_z // ST_W) % ST_H
    b = pid_z % ST_W
    th = (OH - a + ST_H - 1) // ST_H  # rows and columns of this phase
    tw = (OW - b + ST_W - 1) // ST_W

    m_mask, u, t, n = _pixel_tile(tl.program_id(0), N_IMG * th * tw, tw, th, BLOCK_M)
    offs_n, n_mask = _tile_of(tl.program_id(1), COG, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)

    ky0 = _first_tap(a, PAD_H, ST_H, DIL_H, KH)
    kx0 = _first_tap(b, PAD_W, ST_W, DIL_W, KW)
    taps_h = (KH - ky0 + STEP_H - 1) // STEP_H
    taps_w = (KW - kx0 + STEP_W - 1) // STEP_W
    k_tiles = tl.cdiv(CIG, BLOCK_K)

    x_row = x_ptr + n * sx_n + (g * CIG).to(tl.int64) * sx_c  # [BLOCK_M]
    w_col = w_ptr + (g * CIG).to(tl.int64) * sw_i + offs_n.to(tl.int64) * sw_o  # [BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kk in range(taps_h * taps_w * k_tiles):
        tap = kk // k_tiles
        ci = (kk - tap * k_tiles) * BLOCK_K + offs_k
        ky = ky0 + (tap // taps_w) * STEP_H
        kx = kx0 + (tap % taps_w) * STEP_W
        iy = t + (a + PAD_H - ky * DIL_H) // ST_H  # an exact division, so its rounding mode does not matter
        ix = u + (b + PAD_W - kx * DIL_W) // ST_W
        k_mask = ci < CIG
        xa = _load_pixels(x_row, iy, ix, ci, m_mask, k_mask, H, W, sx_c, sx_h, sx_w)
        wb = _load_kn(w_col, ci * sw_i + ky * sw_h + kx * sw_w, k_mask, n_mask)
        acc = _mma(xa, wb, acc, UPCAST, IEEE, TF32)

    co = g * COG + offs_n
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y = acc.to(out_ptr.dtype.element_ty)
    if ACT == 1:
        y = tl.where(y.to(tl.float32) <= 0, 0.0, y.to(tl.float32)).to(out_ptr.dtype.element_ty)
    oy = (a + ST_H * t).to(tl.int64)
    ox = (b + ST_W * u).to(tl.int64)
    o_off = (n * so_n + oy * so_h + ox * so_w)[:, None] + co.to(tl.int64)[None, :] * so_c
    tl.store(out_ptr + o_off, y, mask=m_mask[:, None] & n_mask[None, :])


def conv_transpose2d_forward(x, weight, bias, stride, padding, dilation, groups, activation, out, wrap=None):
    """Write ``act(conv_transpose2d(x, weight, bias))`` into the preallocated ``out`` ``[N, C_out, OH, OW]``.

    Args:
        x: ``[N, C_in, H, W]``, any strides. weight: ``[C_in, C_out/groups, KH, KW]``. bias: ``[C_out]`` or None.
        stride, padding, dilation: 2-tuples of ints (output_padding is implied by out's size).
        activation: "none" | "relu". wrap: ``torch.library.wrap_triton`` inside a ``triton_op``.
    """
    wrap = wrap or identity
    n, _, h, w = x.shape
    c_in, cog, kh, kw = weight.shape
    cig = c_in // groups
    oh, ow = out.shape[2:]
    th, tw = triton.cdiv(oh, stride[0]), triton.cdiv(ow, stride[1])
    if out.numel() == 0:
        return
    cfg = gemm_blocks(n * th * tw, cog, cig)
    grid = check_grid((triton.cdiv(n * th * tw, cfg["BLOCK_M"]), triton.cdiv(cog, cfg["BLOCK_N"]),
                       groups * stride[0] * stride[1]), "conv_transpose2d forward")
    wrap(_conv_transpose_forward_kernel)[grid](
        x, weight, x if bias is None else bias, out,
        n, h, w, oh, ow, cig, cog,
        *x.stride(), *weight.stride(), *out.stride(),
        ST_H=stride[0], ST_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1], KH=kh, KW=kw,
        STEP_H=stride[0] // math.gcd(stride[0], dilation[0]), STEP_W=stride[1] // math.gcd(stride[1], dilation[1]),
        HAS_BIAS=bias is not None, ACT=_ACT_IDS[activation], **dot_flags(x), **cfg,
    )


# ---------------------------------------------------------------------------------------------------------------
# backward


# dy_m at (n, c, oy, ox) (index tensors broadcast to mask's shape; n and c int64), 0 outside ``mask``. The ReLU passes
# the gradient where the output is not <= 0, NaN included, as PyTorch's threshold_backward does.
@triton.jit
def _masked_dy(g_ptr, o_ptr, n, c, oy, ox, mask, sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w,
               ACT: tl.constexpr):
    oy = oy.to(tl.int64)
    ox = ox.to(tl.int64)
    dy = tl.load(g_ptr + n * sg_n + c * sg_c + oy * sg_h + ox * sg_w, mask=mask, other=0.0).to(tl.float32)
    if ACT == 1:
        o = tl.load(o_ptr + n * so_n + c * so_c + oy * so_h + ox * so_w, mask=mask, other=0.0)
        dy = tl.where(o <= 0, 0.0, dy)
    return dy


# dx: a GEMM [BLOCK_M input pixels, BLOCK_K out-ch] x [BLOCK_K, BLOCK_N in-ch] per tap and out-channel tile, the dy_m
# tile gathered at the strided output positions. Grid: (pixel tiles, in-channel tiles, groups).
@triton.jit
def _dgrad_kernel(
    g_ptr, o_ptr, w_ptr, dx_ptr,
    M, H, W, OH, OW, CIG, COG,
    sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w,
    sw_i, sw_o, sw_h, sw_w, sd_n, sd_c, sd_h, sd_w,
    ST_H: tl.constexpr, ST_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ACT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    g = tl.program_id(2)
    m_mask, ix, iy, n = _pixel_tile(tl.program_id(0), M, W, H, BLOCK_M)
    ci, n_mask = _tile_of(tl.program_id(1), CIG, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_row = w_ptr + (g * CIG + ci).to(tl.int64) * sw_i  # [BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    k_tiles = tl.cdiv(COG, BLOCK_K)
    for kk in range(KH * KW * k_tiles):
        ky, kx, co = _tap_channels(kk, k_tiles, offs_k, KW, BLOCK_K)
        k_mask = co < COG
        oy = iy * ST_H - PAD_H + ky * DIL_H
        ox = ix * ST_W - PAD_W + kx * DIL_W
        ok = m_mask & (oy >= 0) & (oy < OH) & (ox >= 0) & (ox < OW)
        dy = _masked_dy(g_ptr, o_ptr, n[:, None], (g * COG + co).to(tl.int64)[None, :], oy[:, None], ox[:, None],
                        ok[:, None] & k_mask[None, :], sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w, ACT)
        wb = _load_kn(w_row, co * sw_o + ky * sw_h + kx * sw_w, k_mask, n_mask)
        acc = _mma(dy.to(w_ptr.dtype.element_ty), wb, acc, UPCAST, IEEE, TF32)

    _store_tile(dx_ptr, n * sd_n + iy.to(tl.int64) * sd_h + ix.to(tl.int64) * sd_w,
                (g * CIG + ci).to(tl.int64) * sd_c, m_mask, n_mask, acc)


# part[split, g*Cig + ci, co, ky, kx] = this split's share of dw: a GEMM [BLOCK_M in-ch, BLOCK_K input pixels] x
# [BLOCK_K, BLOCK_N out-ch] per program. Grid: (groups x taps x channel tiles, splits of the pixel range), as
# _wgrad_program decodes it.
@triton.jit
def _wgrad_kernel(
    x_ptr, g_ptr, o_ptr, part_ptr,
    P, H, W, OH, OW, CIG, COG, C_IN, K_ITERS, ITERS_PER_SPLIT,
    sx_n, sx_c, sx_h, sx_w, sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w,
    ST_H: tl.constexpr, ST_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ACT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n, g, ky, kx, split = _wgrad_program(CIG, COG, KH, KW, BLOCK_M, BLOCK_N)
    ci, m_mask = _tile_of(pid_m, CIG, BLOCK_M)
    ci += g * CIG
    co, n_mask = _tile_of(pid_n, COG, BLOCK_N)
    x_ch = ci.to(tl.int64) * sx_c
    g_ch = (g * COG + co).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kk in range(split * ITERS_PER_SPLIT, tl.minimum((split + 1) * ITERS_PER_SPLIT, K_ITERS)):
        p_mask, ix, iy, n = _pixel_tile(kk, P, W, H, BLOCK_K)
        x_off = n * sx_n + iy.to(tl.int64) * sx_h + ix.to(tl.int64) * sx_w
        xa = tl.load(x_ptr + x_ch[:, None] + x_off[None, :], mask=m_mask[:, None] & p_mask[None, :], other=0.0)
        oy = iy * ST_H - PAD_H + ky * DIL_H
        ox = ix * ST_W - PAD_W + kx * DIL_W
        ok = p_mask & (oy >= 0) & (oy < OH) & (ox >= 0) & (ox < OW)
        dy = _masked_dy(g_ptr, o_ptr, n[:, None], g_ch[None, :], oy[:, None], ox[:, None],
                        ok[:, None] & n_mask[None, :], sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w, ACT)
        acc = _mma(xa, dy.to(x_ptr.dtype.element_ty), acc, UPCAST, IEEE, TF32)

    part_row = (split * C_IN + ci).to(tl.int64) * COG
    p_off = (part_row[:, None] + co[None, :]) * (KH * KW) + ky * KW + kx
    tl.store(part_ptr + p_off, acc, mask=m_mask[:, None] & n_mask[None, :])


def conv_transpose2d_backward(grad_out, out, x, weight, stride, padding, dilation, groups, activation, grad_x,
                              grad_weight, grad_bias, wrap=None):
    """Fill ``grad_x`` / ``grad_weight`` / ``grad_bias`` (each preallocated, or None to skip it).

    Args:
        grad_out: ``[N, C_out, OH, OW]``, any strides. out: the forward's output (read only for the ReLU mask).
        x, weight, stride, padding, dilation, groups, activation: as in the forward (output_padding is implied by
            grad_out's size).
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op``; identity by default.
    """
    wrap = wrap or identity
    n, c_in, h, w = x.shape
    cog, kh, kw = weight.shape[1:]
    cig = c_in // groups
    oh, ow = grad_out.shape[2:]
    act = _ACT_IDS[activation]
    dy = (grad_out, out, *grad_out.stride(), *out.stride())
    geom = dict(ST_H=stride[0], ST_W=stride[1], PAD_H=padding[0], PAD_W=padding[1], DIL_H=dilation[0],
                DIL_W=dilation[1], KH=kh, KW=kw, ACT=act, **dot_flags(x))
    if grad_x is not None and grad_x.numel():
        m = n * h * w
        cfg = gemm_blocks(m, cig, cog)
        grid = check_grid((triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(cig, cfg["BLOCK_N"]), groups),
                          "conv_transpose2d input gradient")
        wrap(_dgrad_kernel)[grid](*dy[:2], weight, grad_x, m, h, w, oh, ow, cig, cog, *dy[2:], *weight.stride(),
                                  *grad_x.stride(), **geom, **cfg)
    if grad_weight is not None and grad_weight.numel():
        p = n * h * w
        cfg = gemm_blocks(cig, cog, p, max_k=64)  # K runs over pixels: long
        programs = triton.cdiv(cig, cfg["BLOCK_M"]) * triton.cdiv(cog, cfg["BLOCK_N"]) * kh * kw * groups
        k_iters = triton.cdiv(p, cfg["BLOCK_K"])
        splits, per = split_count(programs, k_iters)
        part = x.new_empty((splits, c_in, cog, kh, kw), dtype=torch.float32)
        wrap(_wgrad_kernel)[check_grid((programs, splits), "conv_transpose2d weight gradient")](
            x, *dy[:2], part, p, h, w, oh, ow, cig, cog, c_in, k_iters, per, *x.stride(), *dy[2:], **geom, **cfg)
        _split_sum(part, splits, grad_weight, wrap, sizes=(cog, kh, kw))
    if grad_bias is not None and grad_bias.numel():
        if act == 0:
            grad_bias.copy_(grad_out.sum((0, 2, 3)))
            return
        # the fused block's bias reduction without a pool: sum of dy where not (out <= 0), in fixed splits
        m, block_m, block_c = n * oh * ow, 64, 32
        c_out = grad_out.shape[1]
        m_iters = triton.cdiv(m, block_m)
        splits, per = split_count(triton.cdiv(c_out, block_c), m_iters)
        part = x.new_empty((splits, c_out), dtype=torch.float32)
        wrap(_dbias_kernel)[(triton.cdiv(c_out, block_c), splits)](
            grad_out, out, out, part, m, oh, ow, c_out, m_iters, per, *grad_out.stride(), *out.stride(),
            *out.stride(), POOL=POOL_IDS["none"], NWIN=1, BLOCK_M=block_m, BLOCK_C=block_c)
        _split_sum(part, splits, grad_bias, wrap)
