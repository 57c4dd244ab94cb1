"""Pieces shared by the implicit-GEMM convolution kernels (fused Conv2d + bias + ReLU + pool, Conv2d + batch
statistics, ConvTranspose2d): the program-id prologues, the convolution tile, the MMA helper and its precision (TF32
exactly when stock torch's cuDNN convolutions use it, with rounded operands), the backward passes' deterministic split
reductions (bias gradient of a ReLU (+ pool) epilogue, split sums), block sizes, grid checks, shapes."""
import os

import torch
import triton
import triton.language as tl

# Pool kinds as integers: they are passed as tl.constexpr, and ints are the safest constexprs under wrap_triton.
POOL_IDS = {"none": 0, "max": 1, "avg": 2}


@triton.jit
def _round_tf32(x):
    # fp32 -> TF32 (10 mantissa bits) rounding to nearest, ties away from zero, as PTX's cvt.rna.tf32.f32 (what
    # CUTLASS's round-to-nearest tf32 converter emits): add half an ulp of TF32 to the magnitude's bits and clear
    # the 13 dropped bits; inf and NaN pass unchanged, a value past TF32's largest rounds to inf. Integer ops only,
    # so the interpreter runs the same rounding the GPU does.
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x1000) & 0xFFFFE000
    return tl.where((u & 0x7F800000) == 0x7F800000, u, r).to(tl.float32, bitcast=True)


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr, TF32: tl.constexpr):
    # acc += a @ b with fp32 accumulation. UPCAST works around the interpreter's bf16 tl.dot. fp32 operands: IEEE
    # asks for exact fp32 products; TF32 rounds both operands to TF32 first (the tensor cores would truncate them),
    # then multiplies on TF32 tensor cores - the two cases of stock torch's cuDNN convolutions (dot_flags).
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if TF32:
        return tl.dot(_round_tf32(a), _round_tf32(b), acc, input_precision="tf32")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tile_of(pid, LIMIT, BLOCK: tl.constexpr):
    # Indices pid*BLOCK .. pid*BLOCK + BLOCK - 1 (a tile of channels or of flattened pixels) and which are < LIMIT.
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < LIMIT


@triton.jit
def _pixels(offs, D_W, D_H):
    # Flattened pixel index m = (n*D_H + h)*D_W + w -> (w, h, n), n in int64 for the address arithmetic.
    return offs % D_W, (offs // D_W) % D_H, (offs // (D_W * D_H)).to(tl.int64)


@triton.jit
def _pixel_tile(pid, M, D_W, D_H, BLOCK: tl.constexpr):
    # Tile pid of the M flattened pixels: (mask, w, h, n) per row.
    offs, mask = _tile_of(pid, M, BLOCK)
    w, h, n = _pixels(offs, D_W, D_H)
    return mask, w, h, n


@triton.jit
def _wgrad_program(M_CH, N_CH, KH: tl.constexpr, KW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # A weight-gradient program's (pid_m, pid_n, group, tap row r, tap col s, split). Grid axis 0 runs over
    # (group, tap, channel tile m, channel tile n), innermost last - folded into x, whose limit is 2^31 - 1, since
    # taps x groups alone passes y's and z's 65,535 for large depthwise kernels (7x7 x 2048 channels); axis 1 is the
    # split of the reduction.
    n_tiles = tl.cdiv(N_CH, BLOCK_N)
    m_tiles = tl.cdiv(M_CH, BLOCK_M)
    pid = tl.program_id(0)
    pid_n = pid % n_tiles
    pid_m = (pid // n_tiles) % m_tiles
    z = pid // (n_tiles * m_tiles)
    rs = z % (KH * KW)
    return pid_m, pid_n, z // (KH * KW), rs // KW, rs % KW, tl.program_id(1)


@triton.jit
def _tap_channels(kk, k_tiles, offs_k, KW: tl.constexpr, BLOCK_K: tl.constexpr):
    # Step kk of a loop over (tap, channel tile), channel tiles innermost: (tap row, tap col, channel indices).
    tap = kk // k_tiles
    return tap // KW, tap % KW, (kk - tap * k_tiles) * BLOCK_K + offs_k


@triton.jit
def _load_pixels(row_base, ih, iw, ch, m_mask, k_mask, H, W, s_c, s_h, s_w):
    # [rows, channels] tile gathered at per-row image positions (ih, iw) from per-row base pointers; 0 outside the
    # image or the masks.
    ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    ptrs = row_base + ih.to(tl.int64) * s_h + iw.to(tl.int64) * s_w
    return tl.load(ptrs[:, None] + ch[None, :] * s_c, mask=ok[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def _load_kn(col_base, k_off, k_mask, n_mask):
    # [K, N] operand tile: column base pointers plus per-row offsets, 0 outside the masks.
    return tl.load(col_base[None, :] + k_off[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)


@triton.jit
def _store_tile(ptr, row_off, col_off, m_mask, n_mask, acc):
    # Store an fp32 [M, N] tile at ptr + row_off[m] + col_off[n], rounded to ptr's element type.
    tl.store(ptr + row_off[:, None] + col_off[None, :], acc.to(ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def conv_tile(x_row, w_col, oh, ow, m_mask, n_mask, offs_k, H, W, CIG, sx_c, sx_h, sx_w, sw_i, sw_h, sw_w,
              ST_H: tl.constexpr, ST_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
              DIL_H: tl.constexpr, DIL_W: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
              UPCAST: tl.constexpr, IEEE: tl.constexpr, TF32: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One [BLOCK_M conv pixels (oh, ow), BLOCK_N out-ch] tile of the implicit-GEMM convolution, fp32 accumulation:
    #   acc[m, co] = sum_{r, s, ci} x[n, g*Cig + ci, oh*st - pad + r*dil, ow*st - pad + s*dil] * w[co, ci, r, s]
    # (taps outside the image read zero). x_row is each pixel's image + group base pointer, w_col each out-channel's
    # filter. The KH*KW taps and cdiv(Cig, BLOCK_K) channel tiles are flattened into one loop so the compiler can
    # pipeline it.
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    k_tiles = tl.cdiv(CIG, BLOCK_K)
    for kk in range(KH * KW * k_tiles):
        r, s, ci = _tap_channels(kk, k_tiles, offs_k, KW, BLOCK_K)
        k_mask = ci < CIG
        a = _load_pixels(x_row, oh * ST_H - PAD_H + r * DIL_H, ow * ST_W - PAD_W + s * DIL_W, ci, m_mask, k_mask,
                         H, W, sx_c, sx_h, sx_w)
        b = _load_kn(w_col, ci * sw_i + r * sw_h + s * sw_w, k_mask, n_mask)
        acc = _mma(a, b, acc, UPCAST, IEEE, TF32)
    return acc


# ---------------------------------------------------------------------------------------------------------------
# The deterministic split reductions of the backward passes (conv_relu_pool, conv_transpose): a reduction too long for
# one program runs in fixed splits whose fp32 partials ``_split_sum`` adds in split order; no atomics.


# part[split, c] = sum over this split's pooled pixels (n, ph, pw) of
#   none / max: gp where not (o <= 0);   avg: (gp / (PKH*PKW)) * popcount(code)
# which is sum_{n, oh, ow} dy[n, c, oh, ow] (each set bit of an avg code is one conv pixel that receives gp / k, the
# quotient correctly rounded as in conv_relu_pool's _pooled_dy).
@triton.jit
def _dbias_kernel(
    g_ptr, o_ptr, c_ptr, part_ptr, M, PH, PW, C_OUT, M_ITERS, ITERS_PER_SPLIT,
    sg_n, sg_c, sg_h, sg_w, so_n, so_c, so_h, so_w, sc_n, sc_c, sc_h, sc_w,
    POOL: tl.constexpr, NWIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    ch, c_mask = _tile_of(tl.program_id(0), C_OUT, BLOCK_C)
    c64 = ch.to(tl.int64)[None, :]
    split = tl.program_id(1)
    acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for it in range(split * ITERS_PER_SPLIT, tl.minimum((split + 1) * ITERS_PER_SPLIT, M_ITERS)):
        m_mask, pw, ph, n = _pixel_tile(it, M, PW, PH, BLOCK_M)
        pw, ph, n = pw[:, None], ph[:, None], n[:, None]
        mask = m_mask[:, None] & c_mask[None, :]
        gp = tl.load(g_ptr + n * sg_n + c64 * sg_c + ph * sg_h + pw * sg_w, mask=mask, other=0.0).to(tl.float32)
        if POOL == 2:
            code = tl.load(c_ptr + n * sc_n + c64 * sc_c + ph * sc_h + pw * sc_w, mask=mask, other=0).to(tl.int32)
            cnt = tl.zeros((BLOCK_M, BLOCK_C), tl.int32)
            for t in tl.static_range(NWIN):
                cnt += (code >> t) & 1
            acc += tl.math.div_rn(gp, NWIN * 1.0) * cnt.to(tl.float32)
        else:
            o = tl.load(o_ptr + n * so_n + c64 * so_c + ph * so_h + pw * so_w, mask=mask, other=0.0)
            acc += tl.where(o <= 0, 0.0, gp)
    tl.store(part_ptr + split.to(tl.int64) * C_OUT + ch, tl.sum(acc, axis=0), mask=c_mask)


# out[i0, i1, i2, i3] (through its strides) = sum_{split} part[split, ((i0*D1 + i1)*D2 + i2)*D3 + i3], in split order.
@triton.jit
def _split_sum_kernel(part_ptr, out_ptr, L, SPLIT, D1, D2, D3, s0, s1, s2, s3, BLOCK: tl.constexpr):
    offs, mask = _tile_of(tl.program_id(0), L, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    ptrs = part_ptr + offs
    for _ in range(SPLIT):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += L  # 64-bit pointer arithmetic
    i3, i2, rest = _pixels(offs, D3, D2)
    i1 = rest % D1
    i0 = rest // D1
    tl.store(out_ptr + i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3, acc.to(out_ptr.dtype.element_ty), mask=mask)


def split_count(tiles, iters, target_programs=264, min_iters=4):
    """Splits of a reduction of ``iters`` steps over ``tiles`` programs: enough programs to fill a GPU (2 per SM on
    an H100), at least ``min_iters`` steps each. Returns ``(splits, iters_per_split)``, no split empty."""
    splits = max(1, min(triton.cdiv(target_programs, max(tiles, 1)), iters // min_iters))
    per = max(1, triton.cdiv(iters, splits))
    return max(1, triton.cdiv(iters, per)), per


def _split_sum(part, splits, out, wrap, sizes=(1, 1, 1)):
    total = part.numel() // splits
    strides = list(out.stride()) + [0] * (4 - out.dim())
    wrap(_split_sum_kernel)[(triton.cdiv(total, 256),)](part, out, total, splits, *sizes, *strides, BLOCK=256)


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def conv_allows_tf32(device):
    """Whether stock torch runs an fp32 convolution of tensors on ``device`` with TF32, read as cuDNN reads it and
    without raising under either precision API.

    CUDA (and any device but the CPU): cuDNN's convolutions use TF32 exactly when
    ``torch.backends.cudnn.conv.fp32_precision`` resolves to "tf32" (the newer API; "none" inherits from
    ``torch.backends.cudnn.fp32_precision`` and then ``torch.backends.fp32_precision``, and torch's getter returns
    the resolved value). The legacy ``torch.backends.cudnn.allow_tf32`` sets that same flag, but reading it raises
    RuntimeError once the newer API has given cuDNN's conv and RNN different values, so it is read only on a torch
    without the newer API. CPU: stock convolutions are IEEE fp32 - the interpreter's CPU tensors are compared to them.
    """
    if torch.device(device).type == "cpu":
        return False
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if conv is not None:
        return conv == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)  # torch < 2.9


def dot_flags(x):
    """``dict(UPCAST=..., IEEE=..., TF32=...)`` for ``_mma`` on operands of ``x``'s dtype and device."""
    fp32 = x.dtype == torch.float32
    tf32 = fp32 and conv_allows_tf32(x.device)
    return dict(UPCAST=interpreting() and x.dtype == torch.bfloat16, IEEE=fp32 and not tf32, TF32=tf32)


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


GRID_LIMITS = (2**31 - 1, 65_535, 65_535)


def check_grid(grid, what):
    """Raise a clear ValueError when a launch grid passes CUDA's limits (x < 2^31, y and z <= 65,535), instead of
    the driver's 'invalid argument' at launch. Returns ``grid``."""
    for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if size > limit:
            raise ValueError(f"fastcnn: {what} needs {size} programs along grid axis {'xyz'[axis]}, over CUDA's "
                             f"limit of {limit}; split the call (e.g. fewer groups or channels per call)")
    return grid


def identity(kernel):
    return kernel
