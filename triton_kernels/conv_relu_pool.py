"""Fused Conv2d + bias + ReLU (+ max/avg pool), forward and backward, never with a full-resolution tensor in memory.

Forward: an implicit GEMM whose epilogue pools in registers; only the pooled output and its uint8 ``code`` (see
``fastcnn.ops.conv_relu_pool.reference``) reach memory. Backward: the gradient dy w.r.t. the conv output is rebuilt
inside the dgrad and wgrad operand loads from the pooled gradient, ``code`` and ``out`` (``_pooled_dy``); grad_bias
is reduced from the pooled tensors directly. Everything is deterministic: split reductions write fp32 partials that
``_conv_common._split_sum`` adds in a fixed order.
"""
import torch
import triton
import triton.language as tl

from ._conv_common import (POOL_IDS, _dbias_kernel, _load_kn, _mma, _pixel_tile, _split_sum, _store_tile,
                           _tap_channels, _tile_of, _wgrad_program, check_grid, conv_out_size, conv_tile, dot_flags,
                           gemm_blocks, identity, pooled_size, split_count)

# ---------------------------------------------------------------------------------------------------------------
# forward


# For pooled pixel m = (n, ph, pw) and output channel co of group g (Cig / Cog channels per group):
#   y[n, co, oh, ow] = b[co] + sum_{r, s, ci} x[n, g*Cig + ci, oh*st - pad + r*dil, ow*st - pad + s*dil]
#                                               * w[co, ci, r, s]      (taps outside the image read zero)
#   v = relu(y), NaN kept: v = 0 where y <= 0, else y.
# The program scans the pool window t = i*PKW + j row-major, at conv pixel (oh, ow) = (ph*PSH + i, pw*PSW + j):
#   max:  best, code <- v, t  where  v > best or isnan(v)    (first of equal maxima wins, last NaN wins)
#   avg:  out = (sum_t v) / (PKH*PKW) correctly rounded (not the ~2 ulp fast '/'),  bit t of code = not (y <= 0)
#   none: a 1x1 window of stride 1, no code.
# Each window element is one implicit-GEMM tile (_conv_common.conv_tile). y is rounded to the
# output dtype before the ReLU and the comparisons, as the unfused ops see it; accumulation is fp32.
@triton.jit
def _conv_relu_pool_forward_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, code_ptr,
    M, H, W, PH, PW, CIG, COG,
    sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_i, sw_h, sw_w,
    so_n, so_c, so_h, so_w,
    sc_n, sc_c, sc_h, sc_w,
    ST_H: tl.constexpr, ST_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    POOL: tl.constexpr, PKH: tl.constexpr, PKW: tl.constexpr, PSH: tl.constexpr, PSW: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    g = tl.program_id(2)
    m_mask, pw, ph, n = _pixel_tile(tl.program_id(0), M, PW, PH, BLOCK_M)
    offs_n, n_mask = _tile_of(tl.program_id(1), COG, BLOCK_N)
    co = g * COG + offs_n
    offs_k = tl.arange(0, BLOCK_K)

    x_row = x_ptr + n * sx_n + (g * CIG).to(tl.int64) * sx_c  # [BLOCK_M] image + group base
    w_col = w_ptr + co.to(tl.int64) * sw_o  # [BLOCK_N]
    if HAS_BIAS:
        bias = tl.load(b_ptr + co, mask=n_mask, other=0.0).to(tl.float32)

    if POOL == 2:
        best = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)  # running sum
    else:
        best = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)  # running max; relu(y) > -inf always
    code = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)
    for t in range(PKH * PKW):
        oh = ph * PSH + t // PKW
        ow = pw * PSW + t % PKW
        acc = conv_tile(x_row, w_col, oh, ow, m_mask, n_mask, offs_k, H, W, CIG, sx_c, sx_h, sx_w, sw_i, sw_h, sw_w,
                        ST_H, ST_W, PAD_H, PAD_W, DIL_H, DIL_W, KH, KW, UPCAST, IEEE, TF32, BLOCK_M, BLOCK_N,
                        BLOCK_K)
        if HAS_BIAS:
            acc += bias[None, :]
        y = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        v = tl.where(y <= 0, 0.0, y)  # ReLU that keeps NaN
        if POOL == 2:
            best += v
            code = code | ((~(y <= 0)).to(tl.int32) << t)
        else:
            take = (v > best) | (v != v)
            best = tl.where(take, v, best)
            code = tl.where(take, t, code)

    if POOL == 2:
        best = tl.math.div_rn(best, PKH * PKW * 1.0)  # IEEE division, as ATen's avg_pool2d (aveval / divide_factor)
    mask = m_mask[:, None] & n_mask[None, :]
    sp = ph.to(tl.int64)
    spw = pw.to(tl.int64)
    o_off = (n * so_n + sp * so_h + spw * so_w)[:, None] + co.to(tl.int64)[None, :] * so_c
    tl.store(out_ptr + o_off, best.to(out_ptr.dtype.element_ty), mask=mask)
    if POOL != 0:
        c_off = (n * sc_n + sp * sc_h + spw * sc_w)[:, None] + co.to(tl.int64)[None, :] * sc_c
        tl.store(code_ptr + c_off, code.to(tl.uint8), mask=mask)


def conv2d_relu_pool_forward(x, weight, bias, stride, padding, dilation, groups, pool, pool_size, pool_stride,
                             out, code, wrap=None):
    """Write ``pool(relu(conv2d(x, weight, bias)))`` into ``out`` and its uint8 record into ``code``.

    Args:
        x: ``[N, C_in, H, W]``, any strides. weight: ``[C_out, C_in/groups, KH, KW]``. bias: ``[C_out]`` or None.
        stride, padding, dilation, pool_size, pool_stride: 2-tuples of ints. pool: "none" | "max" | "avg".
        out: preallocated ``[N, C_out, PH, PW]`` (x's dtype); code: same-shape uint8, or empty for pool="none".
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op``; identity by default.
    """
    wrap = wrap or identity
    n, _, h, w = x.shape
    c_out, cig, kh, kw = weight.shape
    oh, ow = (conv_out_size(*a) for a in zip((h, w), (kh, kw), stride, padding, dilation))
    ph, pw = pooled_size((oh, ow), pool, pool_size, pool_stride)
    (pkh, pkw), (psh, psw) = ((1, 1), (1, 1)) if pool == "none" else (pool_size, pool_stride)
    assert out.shape == (n, c_out, ph, pw), (out.shape, (n, c_out, ph, pw))
    if pkh * pkw > (8 if pool == "avg" else 256):
        raise ValueError(f"a {pool} pool window of {pkh}x{pkw} does not fit the uint8 code")
    m, cog = n * ph * pw, c_out // groups
    if m == 0 or c_out == 0:
        return
    code_t = out if pool == "none" else code  # never stored to when pool == "none"
    cfg = gemm_blocks(m, cog, cig)
    grid = check_grid((triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(cog, cfg["BLOCK_N"]), groups), "conv2d forward")
    wrap(_conv_relu_pool_forward_kernel)[grid](
        x, weight, x if bias is None else bias, out, code_t,
        m, h, w, ph, pw, cig, cog,
        *x.stride(), *weight.stride(), *out.stride(), *code_t.stride(),
        ST_H=stride[0], ST_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1], KH=kh, KW=kw,
        POOL=POOL_IDS[pool], PKH=pkh, PKW=pkw, PSH=psh, PSW=psw,
        HAS_BIAS=bias is not None, **dot_flags(x), **cfg,
    )


# ---------------------------------------------------------------------------------------------------------------
# backward


# dy[n, c, oh, ow] for pooled gradient gp, pooled output o and code (window t = i*PKW + j, window (ph, pw) covers
# oh = ph*PSH + i, ow = pw*PSW + j):
#   none: gp[n, c, oh, ow]                     where not (o <= 0)
#   max:  sum over windows covering (oh, ow) of gp[ph, pw] where code[ph, pw] == t and not (o[ph, pw] <= 0)
#   avg:  sum over windows covering (oh, ow) of gp[ph, pw] / (PKH*PKW) where bit t of code[ph, pw] is set
#         (each quotient correctly rounded, as ATen's avg_pool2d_backward divides)
# The covering windows are ph = oh // PSH - q for q < cdiv(PKH, PSH) (then i = oh - ph*PSH), and likewise in w.
# Index tensors broadcast to mask's shape; n and c are int64; positions outside ``mask`` give 0.
@triton.jit
def _pooled_dy(g_ptr, o_ptr, c_ptr, n, c, oh, ow, mask, PH, PW,
               sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w, sc_n, sc_c, sc_h, sc_w,
               POOL: tl.constexpr, PKH: tl.constexpr, PKW: tl.constexpr, PSH: tl.constexpr, PSW: tl.constexpr):
    g_base = g_ptr + n * sg_n + c * sg_c
    o_base = o_ptr + n * so_n + c * so_c
    if POOL == 0:
        gp = tl.load(g_base + oh * sg_h + ow * sg_w, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(o_base + oh * so_h + ow * so_w, mask=mask, other=0.0)
        dy = tl.where(o <= 0, 0.0, gp)
    else:
        c_base = c_ptr + n * sc_n + c * sc_c
        dy = tl.zeros(mask.shape, tl.float32)
        for qi in tl.static_range((PKH + PSH - 1) // PSH):
            ph = oh // PSH - qi
            i = oh - ph * PSH
            ok_h = mask & (ph >= 0) & (ph < PH) & (i < PKH)
            for qj in tl.static_range((PKW + PSW - 1) // PSW):
                pw = ow // PSW - qj
                j = ow - pw * PSW
                ok = ok_h & (pw >= 0) & (pw < PW) & (j < PKW)
                gp = tl.load(g_base + ph * sg_h + pw * sg_w, mask=ok, other=0.0).to(tl.float32)
                code = tl.load(c_base + ph * sc_h + pw * sc_w, mask=ok, other=0).to(tl.int32)
                t = tl.where(ok, i * PKW + j, 0)  # keep shift amounts in range on masked lanes
                if POOL == 1:
                    o = tl.load(o_base + ph * so_h + pw * so_w, mask=ok, other=0.0)
                    dy += tl.where((code == t) & ~(o <= 0), gp, 0.0)
                else:
                    dy += tl.where(((code >> t) & 1) != 0, tl.math.div_rn(gp, PKH * PKW * 1.0), 0.0)
    return dy


# grad_x[n, g*Cig + ci, h, w] = sum_{co < Cog, r, s} dy[n, g*Cog + co, oh, ow] * w[g*Cog + co, ci, r, s]
#   where oh = (h + pad - r*dil) / st when that division is exact and 0 <= oh < OH (likewise ow).
# A GEMM [BLOCK_M input pixels, BLOCK_K out-ch] x [BLOCK_K, BLOCK_N in-ch] per tap, the dy tile gathered on the fly.
@triton.jit
def _dgrad_kernel(
    g_ptr, o_ptr, c_ptr, w_ptr, dx_ptr,
    M, H, W, OH, OW, PH, PW, CIG, COG,
    sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w, sc_n, sc_c, sc_h, sc_w,
    sw_o, sw_i, sw_h, sw_w, sd_n, sd_c, sd_h, sd_w,
    ST_H: tl.constexpr, ST_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    POOL: tl.constexpr, PKH: tl.constexpr, PKW: tl.constexpr, PSH: tl.constexpr, PSW: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    g = tl.program_id(2)
    m_mask, iw, ih, n = _pixel_tile(tl.program_id(0), M, W, H, BLOCK_M)
    ci, n_mask = _tile_of(tl.program_id(1), CIG, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_col = w_ptr + ci * sw_i + (g * COG).to(tl.int64) * sw_o  # [BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    k_tiles = tl.cdiv(COG, BLOCK_K)
    for kk in range(KH * KW * k_tiles):
        r, s, co = _tap_channels(kk, k_tiles, offs_k, KW, BLOCK_K)
        k_mask = co < COG
        th = ih + PAD_H - r * DIL_H
        tw = iw + PAD_W - s * DIL_W
        oh = th // ST_H
        ow = tw // ST_W
        ok = m_mask & (th >= 0) & (tw >= 0) & (th % ST_H == 0) & (tw % ST_W == 0) & (oh < OH) & (ow < OW)
        dy = _pooled_dy(g_ptr, o_ptr, c_ptr, n[:, None], (g * COG + co).to(tl.int64)[None, :], oh[:, None],
                        ow[:, None], ok[:, None] & k_mask[None, :], PH, PW,
                        sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w, sc_n, sc_c, sc_h, sc_w,
                        POOL, PKH, PKW, PSH, PSW)
        b = _load_kn(w_col, co.to(tl.int64) * sw_o + r * sw_h + s * sw_w, k_mask, n_mask)
        acc = _mma(dy.to(w_ptr.dtype.element_ty), b, acc, UPCAST, IEEE, TF32)

    _store_tile(dx_ptr, n * sd_n + ih.to(tl.int64) * sd_h + iw.to(tl.int64) * sd_w,
                (g * CIG + ci).to(tl.int64) * sd_c, m_mask, n_mask, acc)


# part[split, g*Cog + co, ci, r, s] = sum over conv pixels p = (n, oh, ow) of this split's range of
#   dy[n, g*Cog + co, oh, ow] * x[n, g*Cig + ci, oh*st - pad + r*dil, ow*st - pad + s*dil]   (0 outside the image)
# Only the OHC x OWC conv pixels that some pool window covers are visited. A GEMM
# [BLOCK_M out-ch, BLOCK_K pixels] x [BLOCK_K, BLOCK_N in-ch] per program; grid = (groups x taps x ch tiles, splits)
# (_wgrad_program).
@triton.jit
def _wgrad_kernel(
    g_ptr, o_ptr, c_ptr, x_ptr, part_ptr,
    P, H, W, OHC, OWC, PH, PW, CIG, COG, C_OUT, K_ITERS, ITERS_PER_SPLIT,
    sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w, sc_n, sc_c, sc_h, sc_w,
    sx_n, sx_c, sx_h, sx_w,
    ST_H: tl.constexpr, ST_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    POOL: tl.constexpr, PKH: tl.constexpr, PKW: tl.constexpr, PSH: tl.constexpr, PSW: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n, g, r, s, split = _wgrad_program(COG, CIG, KH, KW, BLOCK_M, BLOCK_N)
    co, m_mask = _tile_of(pid_m, COG, BLOCK_M)
    co += g * COG
    ci, n_mask = _tile_of(pid_n, CIG, BLOCK_N)
    x_ch = (g * CIG + ci).to(tl.int64) * sx_c
    offs_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for kk in range(split * ITERS_PER_SPLIT, tl.minimum((split + 1) * ITERS_PER_SPLIT, K_ITERS)):
        p_mask, ow, oh, n = _pixel_tile(kk, P, OWC, OHC, BLOCK_K)
        dy = _pooled_dy(g_ptr, o_ptr, c_ptr, n[None, :], co.to(tl.int64)[:, None], oh[None, :], ow[None, :],
                        m_mask[:, None] & p_mask[None, :], PH, PW,
                        sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w, sc_n, sc_c, sc_h, sc_w,
                        POOL, PKH, PKW, PSH, PSW)
        ih = oh * ST_H - PAD_H + r * DIL_H
        iw = ow * ST_W - PAD_W + s * DIL_W
        x_ok = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_off = n * sx_n + ih.to(tl.int64) * sx_h + iw.to(tl.int64) * sx_w
        xv = tl.load(x_ptr + x_off[:, None] + x_ch[None, :], mask=x_ok[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(dy.to(x_ptr.dtype.element_ty), xv, acc, UPCAST, IEEE, TF32)

    part_row = (split * C_OUT + co).to(tl.int64) * CIG
    p_off = (part_row[:, None] + ci[None, :]) * (KH * KW) + r * KW + s
    tl.store(part_ptr + p_off, acc, mask=m_mask[:, None] & n_mask[None, :])


# Shared memory the gathered dy operand of one pipelined loop iteration may take (bytes): Triton's pipeliner stages
# every window's gathers (gp, code and, for max, o) of every covering window, so their size scales with the windows
# covering a conv pixel.
_GATHER_BYTES = 96 * 1024


def pooled_gather_config(cfg, rows, cols, pool, pool_size, pool_stride, itemsize):
    """Tiles and pipeline depth of a backward GEMM whose [rows, cols] operand tile is gathered through
    ``_pooled_dy`` (dgrad: rows = BLOCK_M pixels, cols = BLOCK_K channels; wgrad: rows = BLOCK_M channels,
    cols = BLOCK_K pixels). With overlapping windows a conv pixel has several covering windows, each gathered:
    there the tile is halved (cols first, down to 16) until the windows' gathers fit ``_GATHER_BYTES``, and the loop
    is pipelined two deep, not three (one stage of gathers in flight). The sm_90a compile check
    (tests/triton/sm90_compile.py) proves each case fits Hopper's 232,448 B."""
    if pool == "none":
        return cfg
    windows = triton.cdiv(pool_size[0], pool_stride[0]) * triton.cdiv(pool_size[1], pool_stride[1])
    if windows == 1:
        return cfg
    per_elem = windows * (itemsize + 1 + (itemsize if pool == "max" else 0))  # gp, code (+ o for max)
    cfg = dict(cfg, num_stages=2)
    for key in (cols, rows):
        while cfg[key] > 16 and cfg["BLOCK_M"] * cfg["BLOCK_K"] * per_elem > _GATHER_BYTES:
            cfg[key] //= 2
    return cfg


def conv2d_relu_pool_backward(grad_out, out, code, x, weight, stride, padding, dilation, groups, pool, pool_size,
                              pool_stride, grad_x, grad_weight, grad_bias, wrap=None):
    """Fill ``grad_x`` / ``grad_weight`` / ``grad_bias`` (each preallocated, or None to skip it) for the fused op.

    Args:
        grad_out, out, code: the pooled gradient, the forward's pooled output and its code (empty for "none").
        x, weight, stride, padding, dilation, groups, pool, pool_size, pool_stride: as in the forward.
        wrap: ``torch.library.wrap_triton`` inside a ``triton_op``; identity by default.
    """
    wrap = wrap or identity
    n, _, h, w = x.shape
    c_out, cig, kh, kw = weight.shape
    cog = c_out // groups
    oh, ow = (conv_out_size(*a) for a in zip((h, w), (kh, kw), stride, padding, dilation))
    ph, pw = pooled_size((oh, ow), pool, pool_size, pool_stride)
    (pkh, pkw), (psh, psw) = ((1, 1), (1, 1)) if pool == "none" else (pool_size, pool_stride)
    code_t = out if pool == "none" else code  # never read when pool == "none"
    pooled = (grad_out, out, code_t, *grad_out.stride(), *out.stride(), *code_t.stride())
    geom = dict(ST_H=stride[0], ST_W=stride[1], PAD_H=padding[0], PAD_W=padding[1], DIL_H=dilation[0],
                DIL_W=dilation[1], KH=kh, KW=kw, POOL=POOL_IDS[pool], PKH=pkh, PKW=pkw, PSH=psh, PSW=psw,
                **dot_flags(x))
    if grad_x is not None and grad_x.numel():
        m = n * h * w
        cfg = pooled_gather_config(gemm_blocks(m, cig, cog), "BLOCK_M", "BLOCK_K", pool, (pkh, pkw), (psh, psw),
                                   x.element_size())
        grid = check_grid((triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(cig, cfg["BLOCK_N"]), groups),
                          "conv2d input gradient")
        wrap(_dgrad_kernel)[grid](*pooled[:3], weight, grad_x, m, h, w, oh, ow, ph, pw, cig, cog, *pooled[3:],
                                  *weight.stride(), *grad_x.stride(), **geom, **cfg)
    if grad_weight is not None and grad_weight.numel():
        # conv rows/cols that some pool window covers (floor mode may leave the last ones unused)
        ohc, owc = (oh, ow) if pool == "none" else ((ph - 1) * psh + pkh, (pw - 1) * psw + pkw)
        p = n * ohc * owc if ph * pw > 0 else 0
        cfg = pooled_gather_config(gemm_blocks(cog, cig, p, max_k=64), "BLOCK_M", "BLOCK_K", pool, (pkh, pkw),
                                   (psh, psw), x.element_size())  # K runs over pixels: long
        programs = triton.cdiv(cog, cfg["BLOCK_M"]) * triton.cdiv(cig, cfg["BLOCK_N"]) * kh * kw * groups
        k_iters = triton.cdiv(p, cfg["BLOCK_K"])
        splits, per = split_count(programs, k_iters)
        part = torch.empty((splits, c_out, cig, kh, kw), device=x.device, dtype=torch.float32)
        wrap(_wgrad_kernel)[check_grid((programs, splits), "conv2d weight gradient")](
            *pooled[:3], x, part, p, h, w, ohc, owc, ph, pw, cig, cog, c_out, k_iters, per, *pooled[3:],
            *x.stride(), **geom, **cfg)
        _split_sum(part, splits, grad_weight, wrap, sizes=(cig, kh, kw))
    if grad_bias is not None and grad_bias.numel():
        m, block_m, block_c = n * ph * pw, 64, 32
        m_iters = triton.cdiv(m, block_m)
        splits, per = split_count(triton.cdiv(c_out, block_c), m_iters)
        part = torch.empty((splits, c_out), device=x.device, dtype=torch.float32)
        wrap(_dbias_kernel)[(triton.cdiv(c_out, block_c), splits)](
            *pooled[:3], part, m, ph, pw, c_out, m_iters, per, *pooled[3:],
            POOL=POOL_IDS[pool], NWIN=pkh * pkw, BLOCK_M=block_m, BLOCK_C=block_c)
        _split_sum(part, splits, grad_bias, wrap)
