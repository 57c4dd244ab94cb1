"""Forward of ConvTranspose2d + bias + activation by stride-phase decomposition: one launch, the phase on a grid
axis, every multiply a real one (no zero insertion, no col2im). The math is derived in
``fastcnn.ops.conv_transpose.reference``.
"""
import math

import triton
import triton.language as tl

from ._conv_common import (_load_kn, _load_pixels, _mma, _pixel_tile, _tile_of, check_grid, dot_flags, gemm_blocks,
                           identity)


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
def _conv_transpose_fwd_kernel(
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
    wrap(_conv_transpose_fwd_kernel)[grid](
        x, weight, x if bias is None else bias, out,
        n, h, w, oh, ow, cig, cog,
        *x.stride(), *weight.stride(), *out.stride(),
        ST_H=stride[0], ST_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1], KH=kh, KW=kw,
        STEP_H=stride[0] // math.gcd(stride[0], dilation[0]), STEP_W=stride[1] // math.gcd(stride[1], dilation[1]),
        HAS_BIAS=bias is not None, ACT=1 if activation == "relu" else 0, **dot_flags(x), **cfg,
    )

