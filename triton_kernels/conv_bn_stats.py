"""Conv2d whose epilogue also reduces the batch statistics of its output (cuDNN's ConvBNfprop recipe).

``y = conv2d(x, w)`` (no bias, no activation) is stored in x's dtype, and each program also reduces the per-channel
moments of its tile of the ROUNDED y - the values a separate statistics pass would read back - so BatchNorm's
training statistics cost no second read of y. Partial moments go to ``[m_tiles, C]`` buffers, one row per tile of
BLOCK_M output pixels (pixels numbered m = (n*OH + oh)*OW + ow); the finalize stage of batch_norm_reduce.py merges
the rows in tile order. The tiling is a function of the shape only and nothing is reduced with atomics, so two runs
give the same bits.

Per tile and channel (count n_t = valid pixels of the tile, sums over them only), in fp32:
    mean_t = sum y / n_t,   M2_t = sum (y - mean_t)^2
i.e. centred two-pass moments from values already in registers; merging tiles with Chan's formula (see
batch_norm_reduce.py) adds only non-negative terms, so a large |mean| does not cancel the variance away.
"""
import torch
import triton
import triton.language as tl

from . import batch_norm_reduce
from ._conv_common import _pixel_tile, _tile_of, check_grid, conv_out_size, conv_tile, dot_flags, gemm_blocks, identity


@triton.jit
def _conv_stats_kernel(
    x_ptr, w_ptr, y_ptr, count_part_ptr, mean_part_ptr, m2_part_ptr,
    M, H, W, OH, OW, C, CIG, COG,
    sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_i, sw_h, sw_w,
    sy_n, sy_c, sy_h, sy_w,
    ST_H: tl.constexpr, ST_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(2)
    m_mask, ow, oh, n = _pixel_tile(pid_m, M, OW, OH, BLOCK_M)
    offs_n, n_mask = _tile_of(tl.program_id(1), COG, BLOCK_N)
    co = g * COG + offs_n
    x_row = x_ptr + n * sx_n + (g * CIG).to(tl.int64) * sx_c
    w_col = w_ptr + co.to(tl.int64) * sw_o
    acc = conv_tile(x_row, w_col, oh, ow, m_mask, n_mask, tl.arange(0, BLOCK_K), H, W, CIG, sx_c, sx_h, sx_w,
                    sw_i, sw_h, sw_w, ST_H, ST_W, PAD_H, PAD_W, DIL_H, DIL_W, KH, KW, UPCAST, IEEE,
                    TF32, BLOCK_M, BLOCK_N, BLOCK_K)

    y = acc.to(y_ptr.dtype.element_ty)
    mask = m_mask[:, None] & n_mask[None, :]
    y_off = (n * sy_n + oh.to(tl.int64) * sy_h + ow.to(tl.int64) * sy_w)[:, None] + co.to(tl.int64)[None, :] * sy_c
    tl.store(y_ptr + y_off, y, mask=mask)

    # Moments of the rounded values, over the tile's valid pixels.
    stat_t = mean_part_ptr.dtype.element_ty
    y = tl.where(mask, y.to(stat_t), 0.0)
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(stat_t)
    mean = tl.sum(y, axis=0) / count
    centred = tl.where(mask, y - mean[None, :], 0.0)
    part = pid_m.to(tl.int64) * C + co
    tl.store(count_part_ptr + part, tl.zeros((BLOCK_N,), stat_t) + count, mask=n_mask)
    tl.store(mean_part_ptr + part, mean, mask=n_mask)
    tl.store(m2_part_ptr + part, tl.sum(centred * centred, axis=0), mask=n_mask)


def conv2d_batch_stats(x, weight, stride, padding, dilation, groups, y, mean, var, wrap=None):
    """Write ``conv2d(x, weight)`` into ``y`` and the per-channel mean and biased variance of ``y`` (as stored, i.e.
    rounded to y's dtype) into ``mean`` and ``var``.

    Args:
        x: ``[N, C_in, H, W]`` float32/float16/bfloat16, any strides. weight: ``[C_out, C_in/groups, KH, KW]``.
        stride, padding, dilation: 2-tuples of ints. groups: int.
        y: preallocated ``[N, C_out, OH, OW]`` of x's dtype, any strides; at least one output pixel.
        mean, var: preallocated ``[C_out]`` float32.
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op``; identity by default.
    """
    wrap = wrap or identity
    n, _, h, w = x.shape
    c_out, cig, kh, kw = weight.shape
    oh, ow = (conv_out_size(*a) for a in zip((h, w), (kh, kw), stride, padding, dilation))
    assert y.shape == (n, c_out, oh, ow), (y.shape, (n, c_out, oh, ow))
    m, cog = n * oh * ow, c_out // groups
    cfg = gemm_blocks(m, cog, cig)
    m_tiles = triton.cdiv(m, cfg["BLOCK_M"])
    count_part, mean_part, m2_part = torch.empty(3, m_tiles, c_out, dtype=mean.dtype, device=x.device).unbind(0)
    grid = check_grid((m_tiles, triton.cdiv(cog, cfg["BLOCK_N"]), groups), "conv2d + batch statistics")
    wrap(_conv_stats_kernel)[grid](
        x, weight, y, count_part, mean_part, m2_part,
        m, h, w, oh, ow, c_out, cig, cog,
        *x.stride(), *weight.stride(), *y.stride(),
        ST_H=stride[0], ST_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1], KH=kh, KW=kw, **dot_flags(x), **cfg,
    )
    batch_norm_reduce.merge_partial_stats(count_part, mean_part, m2_part, mean, var, wrap=wrap)
