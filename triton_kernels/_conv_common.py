"""Pieces shared by the fused Conv2d + bias + ReLU + pool kernels: the MMA helper, dot flags, block sizes, shapes."""
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
