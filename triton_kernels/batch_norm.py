"""The fused BatchNorm ops' kernels (math in fastcnn/ops/batch_norm/reference.py): the per-channel reductions,
the elementwise passes, and a Conv2d whose epilogue reduces the batch statistics of its output.

Reductions, deterministic:

* statistics: per-channel ``mean`` and biased ``var`` of ``x`` over its M = N*H*W rows;
* backward: per-channel ``sum dz`` and ``sum dz (x - mean)``, with ``dz = grad_out`` where ``gate > 0`` else 0.

Both run as a two-stage split reduction with no atomics, over a fixed tiling that depends on the shape only. A
tile is BLOCK_R consecutive pixels of one image (the last tile of an image may be partial) x BLOCK_C channels;
tiles are numbered image by image and CHUNK_TILES consecutive tiles form a chunk. Stage 1, one program per (chunk,
channel block), writes the chunk's partial results to ``[chunks, C]`` buffers in the accumulation dtype (fp32, or
fp64 for fp64 inputs); stage 2, one program per channel block, combines the partials in chunk order. Every sum is
reduced in a fixed order, so two runs give the same bits.

Statistics use per-tile two-pass moments merged with Chan et al.'s formula, not sum and sum-of-squares:
``var = E[x^2] - mean^2`` cancels catastrophically when |mean| >> std (a conv output with a large bias), while the
tile's centred M2 = sum (x - tile_mean)^2 is computed from values already in registers and merging
``(n_a, mean_a, M2_a)`` with ``(n_b, mean_b, M2_b)`` only adds non-negative terms:
    n = n_a + n_b,  delta = mean_b - mean_a,  mean = mean_a + delta n_b / n,  M2 = M2_a + M2_b + delta^2 n_a n_b / n.
The backward sums are already centred (x - mean) and are plain sums.

x, grad_out and gate are dense and share x's layout (NCHW or channels_last), so pixel p = h*W + w of image n is at
``n*stride_n + p*stride_p + c*stride_c``. A tile's pixels are consecutive within one image, so its loads are
coalesced in both layouts: along pixels in NCHW (stride_p = 1), along channels in channels_last (stride_c = 1).

Elementwise passes:

* apply: ``out = relu(x * scale[c] + shift[c] + residual)`` and, optionally, the uint8 ReLU mask ``not out <= 0``
  (taken on the rounded output, so NaN passes the gradient as ReLU's backward does);
* backward: ``dz = grad_out`` where ``gate > 0`` (gate: that mask, or a recomputed activation), else 0, and
  ``grad_x = a[c] (dz - b[c] (x - mean[c]) - d[c])``, plus ``dz`` itself for a residual's gradient.

Every tensor of one call is dense in x's layout (NCHW or channels_last), so the kernels walk storage as one flat
range of int64 offsets ``i``, fully coalesced, and read the channel as ``c = (i // stride_c) % C`` (stride_c = H*W in
NCHW, 1 in channels_last). Arithmetic is in the per-channel tensors' dtype (fp32, or fp64 for fp64 inputs) and each
result is rounded once.

Conv2d + batch statistics (cuDNN's ConvBNfprop recipe): ``y = conv2d(x, w)`` (no bias, no activation) is stored in
x's dtype, and each program also reduces the per-channel moments of its tile of the ROUNDED y - the values a separate
statistics pass would read back - so BatchNorm's training statistics cost no second read of y. Partial moments go to
``[m_tiles, C]`` buffers, one row per tile of BLOCK_M output pixels (pixels numbered m = (n*OH + oh)*OW + ow); the
statistics' finalize stage (``merge_partial_stats``) merges the rows in tile order. The tiling is a function of the
shape only and nothing is reduced with atomics, so two runs give the same bits. Per tile and channel (count n_t =
valid pixels of the tile, sums over them only), in fp32:
    mean_t = sum y / n_t,   M2_t = sum (y - mean_t)^2
i.e. centred two-pass moments from values already in registers; merging tiles with Chan's formula (above) adds only
non-negative terms, so a large |mean| does not cancel the variance away.
"""
import torch
import triton
import triton.language as tl

from ._conv_common import (_pixel_tile, _tile_of, check_grid, conv_out_size, conv_tile, dot_flags, gemm_blocks,
                           identity, interpreting)
from ._rounding import _store

# ---------------------------------------------------------------------------------------------------------------
# per-channel reductions


@triton.jit
def _tile(chunk, t, chans, N, C, HW, TILES_PER_IMAGE, CHUNK_TILES, s_n, s_c, s_p, BLOCK_R: tl.constexpr):
    # Tile t of the chunk: image n, pixels p0 .. p0 + BLOCK_R - 1. Returns its offsets ([BLOCK_R, BLOCK_C], int64),
    # mask and number of valid pixels (0 for a tile past the last image).
    tile = chunk.to(tl.int64) * CHUNK_TILES + t
    n = tile // TILES_PER_IMAGE
    p0 = (tile - n * TILES_PER_IMAGE) * BLOCK_R
    p = p0 + tl.arange(0, BLOCK_R)
    offs = (n * s_n + p * s_p)[:, None] + chans.to(tl.int64)[None, :] * s_c
    count = tl.where(n < N, tl.minimum(HW - p0, BLOCK_R), 0)
    return offs, ((p < HW) & (n < N))[:, None] & (chans < C)[None, :], count


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    # Chan et al.: the moments of the union of two disjoint sets (n_b may be 0: the first set is returned).
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / tl.maximum(n, 1.0)
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def _stats_partial_kernel(x_ptr, count_part_ptr, mean_part_ptr, m2_part_ptr, N, C, HW, TILES_PER_IMAGE, CHUNK_TILES,
                          s_n, s_c, s_p, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    chunk = tl.program_id(0)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc_t = mean_part_ptr.dtype.element_ty
    count = tl.zeros((BLOCK_C,), acc_t)
    mean = tl.zeros((BLOCK_C,), acc_t)
    m2 = tl.zeros((BLOCK_C,), acc_t)
    for t in range(CHUNK_TILES):
        offs, mask, n_t = _tile(chunk, t, chans, N, C, HW, TILES_PER_IMAGE, CHUNK_TILES, s_n, s_c, s_p, BLOCK_R)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        n_t = n_t.to(acc_t)
        mean_t = tl.sum(x, axis=0) / tl.maximum(n_t, 1.0)
        centred = tl.where(mask, x - mean_t[None, :], 0.0)
        count, mean, m2 = _chan_merge(count, mean, m2, n_t, mean_t, tl.sum(centred * centred, axis=0))
    out = chunk.to(tl.int64) * C + chans
    tl.store(count_part_ptr + out, count, mask=chans < C)
    tl.store(mean_part_ptr + out, mean, mask=chans < C)
    tl.store(m2_part_ptr + out, m2, mask=chans < C)


@triton.jit
def _stats_finalize_kernel(count_part_ptr, mean_part_ptr, m2_part_ptr, mean_ptr, var_ptr, C, CHUNKS,
                           BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    # BLOCK_K chunks at a time: their union's moments directly (mean = sum n_k mean_k / sum n_k,
    # M2 = sum M2_k + sum n_k (mean_k - mean)^2), then one Chan merge into the running moments.
    chans = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = chans < C
    acc_t = mean_ptr.dtype.element_ty
    count = tl.zeros((BLOCK_C,), acc_t)
    mean = tl.zeros((BLOCK_C,), acc_t)
    m2 = tl.zeros((BLOCK_C,), acc_t)
    for k0 in range(0, CHUNKS, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask = (ks < CHUNKS)[:, None] & c_mask[None, :]
        offs = ks[:, None] * C + chans[None, :]
        n_k = tl.load(count_part_ptr + offs, mask=mask, other=0.0)
        mean_k = tl.load(mean_part_ptr + offs, mask=mask, other=0.0)
        m2_k = tl.load(m2_part_ptr + offs, mask=mask, other=0.0)
        n_b = tl.sum(n_k, axis=0)
        mean_b = tl.sum(n_k * mean_k, axis=0) / tl.maximum(n_b, 1.0)
        spread = mean_k - mean_b[None, :]
        m2_b = tl.sum(m2_k + n_k * spread * spread, axis=0)
        count, mean, m2 = _chan_merge(count, mean, m2, n_b, mean_b, m2_b)
    tl.store(mean_ptr + chans, mean, mask=c_mask)
    tl.store(var_ptr + chans, m2 / tl.maximum(count, 1.0), mask=c_mask)  # (count is 0 only past channel C)


@triton.jit
def _backward_partial_kernel(g_ptr, gate_ptr, x_ptr, mean_ptr, dz_part_ptr, xmu_part_ptr, N, C, HW, TILES_PER_IMAGE,
                             CHUNK_TILES, s_n, s_c, s_p, HAS_MEAN: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    chunk = tl.program_id(0)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc_t = dz_part_ptr.dtype.element_ty
    mean = tl.zeros((BLOCK_C,), acc_t)
    if HAS_MEAN:
        mean = tl.load(mean_ptr + chans, mask=chans < C, other=0.0)
    sum_dz = tl.zeros((BLOCK_C,), acc_t)
    sum_xmu = tl.zeros((BLOCK_C,), acc_t)
    for t in range(CHUNK_TILES):
        offs, mask, _ = _tile(chunk, t, chans, N, C, HW, TILES_PER_IMAGE, CHUNK_TILES, s_n, s_c, s_p, BLOCK_R)
        gate = tl.load(gate_ptr + offs, mask=mask, other=0).to(acc_t)
        dz = tl.where(gate <= 0, 0.0, tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_t))  # ReLU's backward
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        sum_dz += tl.sum(dz, axis=0)
        sum_xmu += tl.sum(dz * (x - mean[None, :]), axis=0)
    out = chunk.to(tl.int64) * C + chans
    tl.store(dz_part_ptr + out, sum_dz, mask=chans < C)
    tl.store(xmu_part_ptr + out, sum_xmu, mask=chans < C)


@triton.jit
def _sum_partials_kernel(a_part_ptr, b_part_ptr, a_ptr, b_ptr, C, CHUNKS, BLOCK_K: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    # a[c] = sum_k a_part[k, c] and the same for b, BLOCK_K chunks at a time in chunk order.
    chans = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = chans < C
    a = tl.zeros((BLOCK_C,), a_ptr.dtype.element_ty)
    b = tl.zeros((BLOCK_C,), b_ptr.dtype.element_ty)
    for k0 in range(0, CHUNKS, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        offs = ks[:, None] * C + chans[None, :]
        mask = (ks < CHUNKS)[:, None] & c_mask[None, :]
        a += tl.sum(tl.load(a_part_ptr + offs, mask=mask, other=0.0), axis=0)
        b += tl.sum(tl.load(b_part_ptr + offs, mask=mask, other=0.0), axis=0)
    tl.store(a_ptr + chans, a, mask=c_mask)
    tl.store(b_ptr + chans, b, mask=c_mask)


def _block_sizes():
    """(BLOCK_R, BLOCK_C, max chunks, BLOCK_K) of the reductions."""
    return (16, 4, 2, 2) if interpreting() else (64, 32, 512, 64)


def tiling(x):
    """The fixed split of a reduction over x ``[N, C, H, W]``: a function of the shape only (never of the device or
    of timing), so results are reproducible. Small under the interpreter, so that test tensors span several tiles
    per chunk and several chunks, the last ones partial. One place for the GPU tuning pass."""
    n, c, h, w = x.shape
    block_r, block_c, max_chunks, block_k = _block_sizes()
    block_r = min(block_r, max(16, triton.next_power_of_2(h * w)))  # small images: fewer idle lanes
    block_c = min(block_c, triton.next_power_of_2(c))
    tiles_per_image = triton.cdiv(h * w, block_r)
    chunk_tiles = triton.cdiv(n * tiles_per_image, max_chunks)
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, TILES_PER_IMAGE=tiles_per_image, CHUNK_TILES=chunk_tiles,
                CHUNKS=triton.cdiv(n * tiles_per_image, chunk_tiles), BLOCK_K=block_k)


def _layout(x):
    """(N, C, H*W, stride_n, stride_c, stride_p) of a dense NCHW or channels_last x."""
    n, c, h, w = x.shape
    if h > 1 and x.stride(2) != w * x.stride(3):
        raise ValueError(f"the BatchNorm reductions need a dense NCHW or channels_last tensor, got strides "
                         f"{x.stride()}")
    return n, c, h * w, x.stride(0), x.stride(1), x.stride(3)


def batch_norm_stats(x, mean, var, wrap=None):
    """Write the per-channel mean and biased variance of ``x`` into ``mean`` and ``var``.

    Args:
        x: ``[N, C, H, W]``, dense (NCHW or channels_last), at least one element per channel.
        mean, var: preallocated ``[C]`` in the accumulation dtype (float32, or float64 for float64 ``x``).
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op``; identity by default.
    """
    wrap = wrap or identity
    n, c, hw, *strides = _layout(x)
    t = tiling(x)
    count_part, mean_part, m2_part = torch.empty(3, t["CHUNKS"], c, dtype=mean.dtype, device=x.device).unbind(0)
    c_blocks = triton.cdiv(c, t["BLOCK_C"])
    wrap(_stats_partial_kernel)[(t["CHUNKS"], c_blocks)](
        x, count_part, mean_part, m2_part, n, c, hw, t["TILES_PER_IMAGE"], t["CHUNK_TILES"], *strides,
        BLOCK_R=t["BLOCK_R"], BLOCK_C=t["BLOCK_C"])
    merge_partial_stats(count_part, mean_part, m2_part, mean, var, wrap)


def merge_partial_stats(count_part, mean_part, m2_part, mean, var, wrap=None):
    """Stage 2 of the statistics: merge ``[chunks, C]`` partial moments (count, mean, M2) in chunk order into
    ``mean`` and biased ``var`` (``[C]``, the partials' dtype). Also the last stage of a fused producer's statistics
    (conv2d_batch_stats)."""
    wrap = wrap or identity
    chunks, c = mean_part.shape
    _, block_c, _, block_k = _block_sizes()
    block_c = min(block_c, triton.next_power_of_2(c))
    wrap(_stats_finalize_kernel)[(triton.cdiv(c, block_c),)](
        count_part, mean_part, m2_part, mean, var, c, chunks, BLOCK_K=block_k, BLOCK_C=block_c)


def batch_norm_backward_reduce(grad_out, gate, x, mean, sum_dz, sum_dz_xmu, wrap=None):
    """Write per-channel ``sum dz`` and ``sum dz (x - mean)`` (``dz = grad_out`` where ``gate > 0``, else 0).

    Args:
        grad_out, gate, x: ``[N, C, H, W]``, dense in one layout (NCHW or channels_last); gate is a uint8 mask or
            has x's dtype.
        mean: ``[C]`` in the accumulation dtype, or None for 0.
        sum_dz, sum_dz_xmu: preallocated ``[C]`` in the accumulation dtype.
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op``; identity by default.
    """
    wrap = wrap or identity
    n, c, hw, *strides = _layout(x)
    t = tiling(x)
    dz_part, xmu_part = torch.empty(2, t["CHUNKS"], c, dtype=sum_dz.dtype, device=x.device).unbind(0)
    c_blocks = triton.cdiv(c, t["BLOCK_C"])
    wrap(_backward_partial_kernel)[(t["CHUNKS"], c_blocks)](
        grad_out, gate, x, sum_dz if mean is None else mean, dz_part, xmu_part, n, c, hw, t["TILES_PER_IMAGE"],
        t["CHUNK_TILES"], *strides, HAS_MEAN=mean is not None, BLOCK_R=t["BLOCK_R"], BLOCK_C=t["BLOCK_C"])
    wrap(_sum_partials_kernel)[(c_blocks,)](
        dz_part, xmu_part, sum_dz, sum_dz_xmu, c, t["CHUNKS"], BLOCK_K=t["BLOCK_K"], BLOCK_C=t["BLOCK_C"])


# ---------------------------------------------------------------------------------------------------------------
# elementwise passes


@triton.jit
def _flat(numel, C, STRIDE_C, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < numel, (offs // STRIDE_C) % C


@triton.jit
def _apply_kernel(x_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, mask_ptr, numel, C, STRIDE_C,
                  HAS_SCALE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SAVE_MASK: tl.constexpr,
                  BLOCK: tl.constexpr):
    offs, mask, c = _flat(numel, C, STRIDE_C, BLOCK)
    acc_t = shift_ptr.dtype.element_ty
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
    if HAS_SCALE:
        v = v * tl.load(scale_ptr + c, mask=mask, other=1.0)
    v = v + tl.load(shift_ptr + c, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        v = v + tl.load(res_ptr + offs, mask=mask, other=0.0).to(acc_t)
    v = tl.where(v <= 0, 0.0, v)  # ReLU that keeps NaN
    _store(out_ptr + offs, v, mask)
    if SAVE_MASK:
        rounded = v.to(out_ptr.dtype.element_ty).to(acc_t)
        tl.store(mask_ptr + offs, (~(rounded <= 0)).to(tl.uint8), mask=mask)


@triton.jit
def _backward_elemt_kernel(g_ptr, gate_ptr, x_ptr, mean_ptr, a_ptr, b_ptr, d_ptr, grad_x_ptr, dz_ptr, numel, C,
                           STRIDE_C, HAS_MEAN: tl.constexpr, HAS_B: tl.constexpr, HAS_D: tl.constexpr,
                           WANT_DZ: tl.constexpr, BLOCK: tl.constexpr):
    offs, mask, c = _flat(numel, C, STRIDE_C, BLOCK)
    acc_t = a_ptr.dtype.element_ty
    gate = tl.load(gate_ptr + offs, mask=mask, other=0).to(acc_t)
    dz = tl.where(gate <= 0, 0.0, tl.load(g_ptr + offs, mask=mask, other=0.0).to(acc_t))
    inner = dz
    if HAS_B:
        centred = tl.load(x_ptr + offs, mask=mask, other=0.0).to(acc_t)
        if HAS_MEAN:
            centred = centred - tl.load(mean_ptr + c, mask=mask, other=0.0)
        inner = inner - tl.load(b_ptr + c, mask=mask, other=0.0) * centred
    if HAS_D:
        inner = inner - tl.load(d_ptr + c, mask=mask, other=0.0)
    _store(grad_x_ptr + offs, tl.load(a_ptr + c, mask=mask, other=0.0) * inner, mask)
    if WANT_DZ:
        _store(dz_ptr + offs, dz, mask)


def _flat_launch(numel):
    block = 256 if interpreting() else 1024
    return (triton.cdiv(numel, block),), dict(BLOCK=block)


def scale_shift_add_relu(x, scale, shift, residual, out, mask, wrap=None):
    """Write ``relu(x * scale + shift + residual)`` into ``out`` and, when ``mask`` is not empty, its ReLU mask.

    Args:
        x: ``[N, C, H, W]``, dense (NCHW or channels_last); residual (or None), out and mask (uint8, or empty) have
            x's shape and strides.
        scale (or None for 1), shift: ``[C]`` in the accumulation dtype (float32, or float64 for float64 ``x``).
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op``; identity by default.
    """
    wrap = wrap or identity
    grid, cfg = _flat_launch(x.numel())
    wrap(_apply_kernel)[grid](
        x, shift if scale is None else scale, shift, x if residual is None else residual, out,
        mask if mask.numel() else out, x.numel(), x.shape[1], x.stride(1),
        HAS_SCALE=scale is not None, HAS_RESIDUAL=residual is not None, SAVE_MASK=mask.numel() > 0, **cfg)


def batch_norm_backward_elemt(grad_out, gate, x, mean, a, b, d, grad_x, dz, wrap=None):
    """Write ``grad_x = a (dz - b (x - mean) - d)`` and, when ``dz`` is not empty, ``dz`` itself.

    Args:
        grad_out, gate (uint8 mask or x's dtype), x: ``[N, C, H, W]``, dense, sharing x's strides; grad_x and dz
            (or empty) too.
        mean, b, d (each None for 0), a: ``[C]`` in the accumulation dtype.
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op``; identity by default.
    """
    wrap = wrap or identity
    grid, cfg = _flat_launch(x.numel())
    wrap(_backward_elemt_kernel)[grid](
        grad_out, gate, x, a if mean is None else mean, a, a if b is None else b, a if d is None else d, grad_x,
        dz if dz.numel() else grad_x, x.numel(), x.shape[1], x.stride(1),
        HAS_MEAN=mean is not None, HAS_B=b is not None, HAS_D=d is not None, WANT_DZ=dz.numel() > 0, **cfg)


# ---------------------------------------------------------------------------------------------------------------
# Conv2d + batch statistics


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
    merge_partial_stats(count_part, mean_part, m2_part, mean, var, wrap=wrap)
