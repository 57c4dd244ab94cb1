"""Shared pieces of the fused-optimizer Triton kernels: host scalars, opmath helpers, the multi-tensor work table.

Multi-tensor apply. One launch covers every tensor of a dtype signature: the host builds (once, then caches) an int64
table on the device with one row per tensor list (the tensors' base addresses), a row of numels and a row of each
tensor's first chunk, plus a work list with one entry ``tensor_id << 32 | chunk`` per chunk of ``chunk`` elements.
Program ``pid`` reads its work entry, turns the addresses into typed pointers (the element type comes from a
"witness" pointer argument: the first tensor of the same list) and streams its chunk in tiles of ``BLOCK``.
Where a table cannot be built (tensors without addresses, i.e. FakeTensor / FunctionalTensor while torch.compile or
opcheck traces the op, or CUDA tensors under the interpreter, which copies kernel arguments to the host) the same
kernels run once per tensor with direct pointer arguments (``TABLE=False``).

Host scalars (lr, betas, eps, ...) are passed as the int64 bit pattern of their float64 value: Triton passes Python
floats as fp32, but the reference computes scalar expressions such as ``lr / (1 - beta1 ** t)`` in float64 and
rounds the result to the opmath type only when it meets a tensor. ``_hp`` decodes them in-kernel.
"""
import operator
import struct
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .._conv_common import interpreting
from .._rounding import _store

# Set to False to force the per-tensor launches (tests use it to cover that path).
MULTI_TENSOR = True
# LARS caps the partial sums each update program re-reduces by growing the chunk for very large tensors.
LARS_MAX_PARTS = 1024
_TABLE_CACHE = OrderedDict()
_TABLE_CACHE_SIZE = 16
_data_ptr, _numel, _dtype = torch.Tensor.data_ptr, torch.Tensor.numel, operator.attrgetter("dtype")


def config():
    """Tile and chunk sizes: one place for the H100 tuning pass. Small under the interpreter, so that the test
    tensors span several chunks and end on partial tiles."""
    if interpreting():
        return dict(BLOCK=256, CHUNK=512, RBLOCK=2, num_warps=1)
    return dict(BLOCK=1024, CHUNK=16384, RBLOCK=512, num_warps=4)


def bits(x):
    """The int64 bit pattern of float(x) as a float64, for ``_hp``."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]




@triton.jit
def _heavy_ball(b_ptr, offs, mask, d, mom, omd, FIRST: tl.constexpr, NESTEROV: tl.constexpr):
    # SGD momentum on a step direction d (opmath): b = d on the first step, else b = mu*b + (1-dampening)*d, stored;
    # returns the new direction, d + mu*b with Nesterov, else b.
    if FIRST:
        b = d
    else:
        b = mom * tl.load(b_ptr + offs, mask=mask, other=0.0).to(d.dtype) + omd * d
    _store(b_ptr + offs, b, mask)
    if NESTEROV:
        return d + mom * b
    return b


@triton.jit
def _hp(b):
    # A host float64 scalar passed as its bit pattern (see bits()).
    return b.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _om(x, F64: tl.constexpr):
    # Round a float64 scalar to the opmath type, as torch does when a Python float meets an opmath tensor.
    if F64:
        return x
    else:
        return x.to(tl.float32)


@triton.jit
def _div(a, b, F64: tl.constexpr):
    # IEEE division (fp32 `/` in Triton is the approximate div.full.f32 on NVIDIA GPUs; fp64 `/` is exact).
    if F64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(x, F64: tl.constexpr):
    # IEEE square root (tl.sqrt is sqrt.approx for fp32; for fp64 it is correctly rounded).
    if F64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _powi(x, t):
    # x ** t for float64 x and a whole-number float64 t >= 0, by binary exponentiation (Triton has no portable pow).
    n = t.to(tl.int64)
    r = x * 0.0 + 1.0
    while n > 0:
        r = tl.where((n & 1) == 1, r * x, r)
        x = x * x
        n = n >> 1
    return r


@triton.jit
def _lr(lr_ptr, lr_bits, HAS_LR_T: tl.constexpr):
    # lr_tensor (read on the device) replaces lr; float64, like the reference's float(lr_tensor.item()).
    if HAS_LR_T:
        return tl.load(lr_ptr).to(tl.float64)
    else:
        return _hp(lr_bits)


@triton.jit
def _grad(g_ptr, offs, mask, scale, like, HAS_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr, F64: tl.constexpr,
          WRITE: tl.constexpr):
    # g = grad / grad_scale (written back when WRITE, as the reference does), then negated when maximizing.
    # `like`: an opmath scalar, whose dtype the gradient is converted to.
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(like.dtype)
    if HAS_SCALE:
        g = _div(g, scale, F64)
        if WRITE:
            _store(g_ptr + offs, g, mask)
    if MAXIMIZE:
        g = -g
    return g


@triton.jit
def _work(pid, work_ptr, tab_ptr, numel, chunk, inf_ptr, HAS_INF: tl.constexpr, TABLE: tl.constexpr):
    # (tensor id, first element of this program's chunk, end of the chunk (>= start), live numel): numel reads 0
    # when found_inf is set, so every loop below runs zero times and nothing is loaded or stored.
    if TABLE:
        w = tl.load(work_ptr + pid)
        tid = w >> 32
        cidx = w - (tid << 32)
        n = tl.load(tab_ptr + tid)
    else:
        tid = pid * 0
        cidx = pid
        n = pid * 0 + numel  # a tensor even where Triton passed numel as a constexpr
    n = n.to(tl.int64)
    if HAS_INF:
        n = tl.where(tl.load(inf_ptr) != 0, 0, n)
    start = cidx.to(tl.int64) * chunk
    end = tl.maximum(tl.minimum(start + chunk, n), start)
    return tid, start, end, n


@triton.jit
def _row_ptr(tab_ptr, row, n_tensors, tid, witness, ALIGNED: tl.constexpr):
    # Base pointer of tensor `tid` in table row `row`, typed like `witness`. ALIGNED: every address in the table is
    # 16-byte aligned, which lets full tiles use 16-byte vector loads.
    ptr = tl.load(tab_ptr + row * n_tensors + tid).to(witness.dtype)
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)  # on the pointer: a hint on the int64 does not survive the cast
    return ptr


@triton.jit
def _param_grad_ptrs(tab_ptr, n_tensors, tid, p_ptr, g_ptr, ALIGNED: tl.constexpr):
    # Tensor `tid`'s param and grad base pointers (table rows 2 and 3; every optimizer's first two lists).
    return _row_ptr(tab_ptr, 2, n_tensors, tid, p_ptr, ALIGNED), _row_ptr(tab_ptr, 3, n_tensors, tid, g_ptr, ALIGNED)


@triton.jit
def _grad_scale(scale_ptr, HAS_SCALE: tl.constexpr, F64: tl.constexpr):
    # The gradient scale in opmath (0.0, never read, without one).
    scale = 0.0
    if HAS_SCALE:
        scale = _om(tl.load(scale_ptr).to(tl.float64), F64)
    return scale


@triton.jit
def _whole_tile(it, BLOCK: tl.constexpr):
    # Offsets and mask of the whole tile starting at `it`: declared BLOCK-aligned, and the mask's bound a multiple of
    # BLOCK, so its accesses vectorise.
    base = tl.multiple_of(it, BLOCK)
    offs = base + tl.arange(0, BLOCK)
    return offs, offs < base + BLOCK


def _is_dense(t):
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True


def check_lists(rows, names):
    """Validate a row of tensor lists: equal lengths, one device, matching shapes and element-wise layouts."""
    n = len(rows[0])
    device = None
    for row, name in zip(rows, names):
        if len(row) != n:
            raise ValueError(f"{name}: {len(row)} tensors, expected {n}")
        for t in row:
            if device is None:
                device = t.device
            elif t.device != device:
                raise ValueError(f"{name}: tensors on {device} and {t.device}")
    for i in range(n):
        t0 = rows[0][i]
        for row, name in zip(rows, names):
            t = row[i]
            if name == "steps":
                if t.numel() != 1:
                    raise ValueError(f"steps[{i}] has {t.numel()} elements, expected 1")
                continue
            if t.shape != t0.shape:
                raise ValueError(f"{name}[{i}]: shape {tuple(t.shape)} != {tuple(t0.shape)}")
            if t.numel() > 1 and not (t.is_contiguous() and t0.is_contiguous()):
                if t.stride() != t0.stride() or not _is_dense(t):
                    raise ValueError(f"{name}[{i}]: needs a dense layout with params[{i}]'s strides")
    return device


def use_table(rows, device):
    """Whether the multi-tensor table path can run: real tensors with addresses the kernels can dereference."""
    if not MULTI_TENSOR or (interpreting() and device.type != "cpu"):
        return False
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return False
    plain = (torch.Tensor, torch.nn.Parameter)
    return all(type(t) in plain for row in rows for t in row)


def chunk_size(cfg, rows, max_parts=None):
    """Elements per program: cfg CHUNK, grown (in whole BLOCKs) so no tensor has more than max_parts chunks."""
    chunk = cfg["CHUNK"]
    if max_parts:
        biggest = max((t.numel() for t in rows[0]), default=0)
        chunk = max(chunk, cfg["BLOCK"] * triton.cdiv(triton.cdiv(biggest, max_parts), cfg["BLOCK"]))
    return chunk


class Group:
    """The tensors of one dtype signature and how to launch over them.

    Table mode: ``tensors`` holds one witness per list, ``tab``/``work`` the device table, ``n_tensors`` its width,
    ``grid`` the number of chunks. Direct mode (one Group per tensor): ``tensors`` are that tensor's entries,
    ``tab``/``work`` are dummies, ``numel`` its size.
    """

    def __init__(self, tensors, tab, work, n_tensors, numel, grid, table, aligned, f64):
        self.tensors, self.tab, self.work = tensors, tab, work
        self.n_tensors, self.numel, self.grid = n_tensors, numel, grid
        self.table, self.aligned, self.f64 = table, aligned, f64


def _build_table(rows, idx, chunk, device):
    numels = [rows[0][i].numel() for i in idx]
    counts = [triton.cdiv(n, chunk) for n in numels]
    firsts, total = [], 0
    for c in counts:
        firsts.append(total)
        total += c
    addrs = [[row[i].data_ptr() for i in idx] for row in rows]
    aligned = all(a % 16 == 0 for r, row in zip(addrs, rows) for a, i in zip(r, idx) if row[i].numel() > 1)
    work = [(t << 32) | c for t, n in enumerate(counts) for c in range(n)]
    flat = numels + firsts + [a for r in addrs for a in r] + work
    host = torch.tensor(flat, dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
        buf = host.to(device, non_blocking=True)
    else:
        buf = host.to(device)
    width = len(idx)
    tab = buf[: (2 + len(rows)) * width]
    return tab, buf[tab.numel():], total, aligned, host


def groups(rows, names, chunk):
    """Split the call into launches: one Group per dtype signature (table mode) or per tensor (direct mode).

    Table rows: 0 numel, 1 first chunk, 2 + k the k-th list of ``rows``. The tables are cached on the tensors'
    addresses, sizes and dtypes and the chunk size, so a training loop builds (and validates) them once; a hit costs
    about 0.5 us per tensor of Python.
    """
    if not rows[0]:
        check_lists(rows, names)
        return []
    device = rows[0][0].device
    if not use_table(rows, device):
        check_lists(rows, names)
        out = []
        for i in range(len(rows[0])):
            ts = [row[i] for row in rows]
            numel = ts[0].numel()
            out.append(Group(ts, ts[0], ts[0], 1, numel, triton.cdiv(numel, chunk), False, False,
                             ts[0].dtype == torch.float64))
        return out
    key = (device, chunk) + tuple((tuple(map(_data_ptr, row)), tuple(map(_numel, row)), tuple(map(_dtype, row)))
                                  for row in rows)
    cached = _TABLE_CACHE.get(key)
    if cached is None:
        check_lists(rows, names)
        sigs = OrderedDict()
        for i in range(len(rows[0])):
            sigs.setdefault(tuple(row[i].dtype for row in rows), []).append(i)
        cached = []
        for idx in sigs.values():
            tab, work, total, aligned, host = _build_table(rows, idx, chunk, device)
            cached.append((idx[0], len(idx), tab, work, total, aligned, host))
        _TABLE_CACHE[key] = cached
        while len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
            _TABLE_CACHE.popitem(last=False)
    else:
        _TABLE_CACHE.move_to_end(key)
    out = []
    for i0, width, tab, work, total, aligned, _host in cached:
        ts = [row[i0] for row in rows]  # witnesses: their pointer types type the table's addresses
        out.append(Group(ts, tab, work, width, 0, total, True, aligned, ts[0].dtype == torch.float64))
    return out


def scalar_or(t, dummy):
    """(tensor, present) for an optional 0-dim tensor argument; absent ones are replaced by a dummy."""
    return (dummy, False) if t is None else (t, True)
