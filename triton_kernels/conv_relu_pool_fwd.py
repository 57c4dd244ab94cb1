"""Forward of the fused Conv2d + bias + ReLU (+ max/avg pool): implicit GEMM whose epilogue pools in registers.

Only the pooled output and its uint8 ``code`` (see ``fastcnn.ops.conv_relu_pool.reference``) reach memory; the
full-resolution convolution output never does.
"""
import triton
import triton.language as tl

from ._conv_common import (POOL_IDS, _pixel_tile, _tile_of, check_grid, conv_out_size, conv_tile, dot_flags,
                           gemm_blocks, identity, pooled_size)


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
def _conv_relu_pool_fwd_kernel(
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
    wrap(_conv_relu_pool_fwd_kernel)[grid](
        x, weight, x if bias is None else bias, out, code_t,
        m, h, w, ph, pw, cig, cog,
        *x.stride(), *weight.stride(), *out.stride(), *code_t.stride(),
        ST_H=stride[0], ST_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1], KH=kh, KW=kw,
        POOL=POOL_IDS[pool], PKH=pkh, PKW=pkw, PSH=psh, PSW=psw,
        HAS_BIAS=bias is not None, **dot_flags(x), **cfg,
    )
