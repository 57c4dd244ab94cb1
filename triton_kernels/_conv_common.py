"""Pieces shared by the implicit-GEMM convolution kernels (fused Conv2d + bias + ReLU + pool, Conv2d + batch
statistics): the convolution tile, the MMA helper, dot flags, block sizes, shapes."""
import os

import torch
import triton
import triton.language as tl

# Pool kinds as integers: they are passed as tl.constexpr, and ints are the safest constexprs under wrap_triton.
POOL_IDS = {"none": 0, "max": 1, "avg": 2}


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # acc += a @ b with fp32 accumulation. UPCAST works around the interpreter's bf16 tl.dot; IEEE asks for exact
    # fp32 products (no TF32), as cuDNN does when torch.backends.cudnn.allow_tf32 is False.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def conv_tile(x_row, w_col, oh, ow, m_mask, n_mask, offs_k, H, W, CIG, sx_c, sx_h, sx_w, sw_i, sw_h, sw_w,
              ST_H: tl.constexpr, ST_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
              DIL_H: tl.constexpr, DIL_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
              UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr):
    # One [BLOCK_M conv pixels (oh, ow), BLOCK_N out-ch] tile of the implicit-GEMM convolution, fp32 accumulation:
    #   acc[m, co] = sum_{r, s, ci} x[n, g*Cig + ci, oh*st - pad + r*dil, ow*st - pad + s*dil] * w[co, ci, r, s]
    # (taps outside the image read zero). x_row is each pixel's image + group base pointer, w_col each out-channel's
    # filter. The KH*KW taps and cdiv(Cig, BLOCK_K) channel tiles are flattened into one loop so the compiler can
    # pipeline it.
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    k_tiles = tl.cdiv(CIG, BLOCK_K)
    for kk in range(KH * KW * k_tiles):
        rs = kk // k_tiles
        ci = (kk - rs * k_tiles) * BLOCK_K + offs_k
        r = rs // KW
        s = rs % KW
        ih = oh * ST_H - PAD_H + r * DIL_H
        iw = ow * ST_W - PAD_W + s * DIL_W
        a_mask = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        k_mask = ci < CIG
        a_ptrs = x_row + ih.to(tl.int64) * sx_h + iw.to(tl.int64) * sx_w
        a = tl.load(a_ptrs[:, None] + ci[None, :] * sx_c, mask=a_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_col[None, :] + ci[:, None] * sw_i + r * sw_h + s * sw_w,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(a, b, acc, UPCAST, IEEE)
    return acc


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_flags(dtype):
    """``dict(UPCAST=..., IEEE=...)`` for ``_mma`` on operands of ``dtype``."""
    interp = interpreting()
    return dict(
        UPCAST=interp and dtype == torch.bfloat16,
        IEEE=dtype == torch.float32 and (interp or not torch.backends.cudnn.allow_tf32),
    )


def conv_out_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pooled_size(conv_size, pool, pool_size, pool_stride):
    """Pooled extent per spatial dim (floor mode, no padding); ``pool="none"`` keeps the conv size."""
    if pool == "none":
        return conv_size
    return tuple((c - k) // s + 1 for c, k, s in zip(conv_size, pool_size, pool_stride))


def _pow2_tile(n, lo, hi):
    """Smallest power of two >= n, clamped to [lo, hi] (tl.dot needs every dim >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def gemm_blocks(m, n, k, max_k=32):
    """Fixed tile sizes for an [m, k] x [k, n] implicit GEMM: one place to tune (or to plug an autotune table in)."""
    return dict(BLOCK_M=_pow2_tile(m, 16, 64), BLOCK_N=_pow2_tile(n, 16, 64), BLOCK_K=_pow2_tile(k, 16, max_k),
                num_warps=4)


def identity(kernel):
    return kernel
