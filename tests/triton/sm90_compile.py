"""Compile every fastcnn Triton kernel for Hopper (sm_90a) through the launchers the ops call, without a GPU.

Each case calls a ``fastcnn.triton_kernels`` launcher with ``meta`` tensors (no memory, addresses 0 like the aligned
ones a CUDA allocator returns) and a recording ``wrap`` in place of ``torch.library.wrap_triton``: the launcher does
all its host work - tiling, grids, splits, tables, dot precision - and every kernel launch it would make is recorded
instead of run. Each distinct launch (kernel + specialisation) is then compiled with ``triton.compile`` for
``GPUTarget("cuda", 90, 32)``, specialised exactly as ``JITFunction.run`` would (Triton's own binder), and checked:

* it compiles (no OutOfResources, no unsupported op),
* its shared memory per block is within Hopper's 232,448 B,
* its grid is within CUDA's limits (x < 2^31, y and z <= 65,535),
* registers and spills, from Triton's bundled ``ptxas -v`` on the PTX, are reported.

Run as a script it prints the table (``--json FILE`` also writes the rows) and exits 1 on any failure; the tests in
test_sm90_compile.py run it in a clean subprocess (no TRITON_INTERPRET, a fresh cache directory).
"""
import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

SMEM_LIMIT = 232_448  # bytes of shared memory a block may use on an H100 / H200
GRID_LIMITS = (2**31 - 1, 65_535, 65_535)


class Recorder:
    """The ``wrap`` the launchers take: ``wrap(kernel)[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, case):
        self.case = case
        self.launches = []

    def __call__(self, kernel):
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.launches.append((recorder.case, kernel, tuple(grid), args, kwargs))
                return launch

        return _Grid()


def load_kernels():
    """Import ``fastcnn.triton_kernels``; should fastcnn's upper layers fail to import, load it from its source
    folder alone (the kernels import nothing from the rest of fastcnn), so the check still covers the files the
    ops import."""
    import importlib.util

    name = "fastcnn.triton_kernels"
    try:
        importlib.import_module(name)
    except Exception:  # a broken upper layer: reported by its own tests
        sys.modules.pop(name, None)
    if name not in sys.modules:
        folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "triton_kernels")
        spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _meta(shape, dtype, channels_last=False):
    import torch

    fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


def _conv_relu_pool_case(rec, dtype, cl, n, c_in, c_out, hw, k, stride, pad, dil, groups, pool, pk, ps, bias=True):
    import torch

    from fastcnn.triton_kernels._conv_common import conv_out_size, pooled_size
    from fastcnn.triton_kernels.conv_relu_pool import conv2d_relu_pool_backward, conv2d_relu_pool_forward

    x = _meta((n, c_in, hw, hw), dtype, cl)
    w = _meta((c_out, c_in // groups, k, k), dtype, cl)
    b = _meta((c_out,), dtype) if bias else None
    conv = conv_out_size(hw, k, stride, pad, dil)
    ph, pw = pooled_size((conv, conv), pool, (pk, pk), (ps, ps))
    out = _meta((n, c_out, ph, pw), dtype, cl)
    code = _meta((n, c_out, ph, pw), torch.uint8, cl) if pool != "none" else _meta((0,), torch.uint8)
    geom = ((stride, stride), (pad, pad), (dil, dil), groups, pool, (pk, pk), (ps, ps))
    conv2d_relu_pool_forward(x, w, b, *geom[:4], pool, (pk, pk), (ps, ps), out, code, wrap=rec)
    conv2d_relu_pool_backward(_meta(out.shape, dtype, cl), out, code, x, w, *geom, _meta(x.shape, dtype, cl),
                              _meta(w.shape, dtype, cl), _meta((c_out,), dtype) if bias else None, wrap=rec)


def _conv_transpose_case(rec, dtype, cl, n, c_in, c_out, hw, k, stride, pad, out_pad, groups, act):
    from fastcnn.triton_kernels.conv_transpose import conv_transpose2d_backward, conv_transpose2d_forward

    x = _meta((n, c_in, hw, hw), dtype, cl)
    w = _meta((c_in, c_out // groups, k, k), dtype, cl)
    o = (hw - 1) * stride - 2 * pad + (k - 1) + out_pad + 1
    out = _meta((n, c_out, o, o), dtype, cl)
    geom = ((stride, stride), (pad, pad), (1, 1), groups, act)
    conv_transpose2d_forward(x, w, _meta((c_out,), dtype), *geom, out, wrap=rec)
    conv_transpose2d_backward(_meta(out.shape, dtype, cl), out, x, w, *geom, _meta(x.shape, dtype, cl),
                              _meta(w.shape, dtype, cl), _meta((c_out,), dtype), wrap=rec)


def _conv_batch_stats_case(rec, dtype, cl, n, c_in, c_out, hw, k, stride, pad):
    import torch

    from fastcnn.triton_kernels._conv_common import conv_out_size
    from fastcnn.triton_kernels.batch_norm import conv2d_batch_stats

    x = _meta((n, c_in, hw, hw), dtype, cl)
    w = _meta((c_out, c_in, k, k), dtype, cl)
    o = conv_out_size(hw, k, stride, pad, 1)
    y = _meta((n, c_out, o, o), dtype, cl)
    conv2d_batch_stats(x, w, (stride, stride), (pad, pad), (1, 1), 1, y, _meta((c_out,), torch.float32),
                       _meta((c_out,), torch.float32), wrap=rec)


def _batch_norm_case(rec, dtype, cl, n, c, hw):
    import torch

    from fastcnn.triton_kernels import batch_norm

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = _meta((n, c, hw, hw), dtype, cl)
    ch = [_meta((c,), acc) for _ in range(4)]
    batch_norm.batch_norm_stats(x, ch[0], ch[1], wrap=rec)
    mask = _meta(x.shape, torch.uint8, cl)
    batch_norm.scale_shift_add_relu(x, ch[0], ch[1], _meta(x.shape, dtype, cl), _meta(x.shape, dtype, cl), mask,
                                    wrap=rec)
    batch_norm.batch_norm_backward_reduce(_meta(x.shape, dtype, cl), mask, x, ch[0], ch[2], ch[3], wrap=rec)
    batch_norm.batch_norm_backward_elemt(_meta(x.shape, dtype, cl), mask, x, ch[0], *ch[1:4],
                                         _meta(x.shape, dtype, cl), _meta(x.shape, dtype, cl), wrap=rec)


def _optim_case(rec, dtype, state_dtype):
    import torch

    from fastcnn.triton_kernels import optim

    shapes = [(64, 3, 7, 7), (64,), (256, 64, 1, 1), (1000, 2048)]  # a few of ResNet-50's parameters

    def lst(dt):
        return [_meta(s, dt) for s in shapes]

    p, g = lst(dtype), lst(dtype)
    steps = [_meta((), torch.float32) for _ in shapes]
    lr_t, scale, found = _meta((), torch.float32), _meta((), torch.float32), _meta((), torch.float32)
    optim.adam_(p, g, lst(state_dtype), lst(state_dtype), lst(state_dtype), steps, 1e-3, lr_t, 0.9, 0.999, 1e-2,
                1e-8, True, False, True, scale, found, wrap=rec)
    optim.sgd_(p, g, lst(state_dtype), 0.1, None, 0.9, 0.0, 1e-4, True, False, False, scale, found, wrap=rec)
    optim.adagrad_(p, g, lst(state_dtype), steps, 0.1, None, 0.0, 1e-4, 1e-10, False, None, None, wrap=rec)
    optim.lars_(p, g, lst(state_dtype), 0.1, lr_t, 0.9, 0.0, 1e-4, 1e-3, 1e-8, False, False, True, False, False,
                False, scale, found, wrap=rec)


def _ieee(fn):
    """``fn`` run with cuDNN's fp32 convolutions set to IEEE (torch's newer API), as a user would set it."""
    def run(rec):
        import torch

        conv = torch.backends.cudnn.conv
        saved = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            fn(rec)
        finally:
            conv.fp32_precision = saved
    return run


def cases(quick=False):
    """(name, function of the recorder) for every case. Headline shapes (batch 32, 64 channels, 56x56, 3x3 conv):
    every pool in both layouts, the dtype cycling so each pool meets each dtype across its layouts, plus fp32 and
    bf16 at the pools the issue measured over the limit; then edge shapes (first layer C=3 7x7/s2 at 224, odd 13->97
    channels on a 7x7 image with dilation, 1x1 without bias, a depthwise 7x7 over 2048 channels whose taps x groups
    pass 65,535), the transposed convolution, conv + batch statistics, BatchNorm and the optimizers, each dtype and
    layout at least once. A full product of cases compiles the same kernels many times over (minutes each on 2
    cores); this set keeps the CI check within a few minutes."""
    import torch

    f32, f16, b16 = torch.float32, torch.float16, torch.bfloat16
    names = {f32: "fp32", f16: "fp16", b16: "bf16"}
    dtypes = [f32, b16, f16]
    pools = [("none", 1, 1), ("max", 2, 2), ("max", 3, 2), ("max", 3, 1), ("avg", 2, 2), ("avg", 2, 1)]
    headline = {(pool, names[dtypes[(i + cl) % 3]], cl) for i, pool in enumerate(pools) for cl in (1, 0)}
    headline |= {(("max", 3, 2), "fp32", cl) for cl in (1, 0)} | {(("max", 3, 1), "fp32", cl) for cl in (1, 0)}
    headline |= {(("avg", 2, 1), "fp32", 1), (("max", 3, 1), "bf16", 1)}
    if quick:
        headline = {(("max", 3, 1), "fp32", 0), (("avg", 2, 2), "bf16", 1)}
    by_name = {v: k for k, v in names.items()}
    out = []
    for (pool, pk, ps), dn, cl in sorted(headline, key=lambda c: (pools.index(c[0]), c[1], -c[2])):
        out.append((f"conv_relu_pool {dn} {'NHWC' if cl else 'NCHW'} {pool} {pk}x{pk}/s{ps} 32x64x56x56",
                    lambda r, dt=by_name[dn], cl=bool(cl), p=(pool, pk, ps):
                    _conv_relu_pool_case(r, dt, cl, 32, 64, 64, 56, 3, 1, 1, 1, 1, *p)))
    # fp32 with TF32 off (the cases above follow torch's default, cuDNN convs in TF32): the IEEE kernels
    out.append(("conv_relu_pool fp32-ieee NHWC max 2x2/s2 32x64x56x56",
                _ieee(lambda r: _conv_relu_pool_case(r, f32, True, 32, 64, 64, 56, 3, 1, 1, 1, 1, "max", 2, 2))))
    if quick:
        return out
    out += [
        ("conv_relu_pool bf16 NHWC first layer C=3 7x7/s2 224 + max 3x3/s2",
         lambda r: _conv_relu_pool_case(r, b16, True, 32, 3, 64, 224, 7, 2, 3, 1, 1, "max", 3, 2)),
        ("conv_relu_pool fp32 NCHW odd 13->97 ch 7x7 image dil 2 + avg 2x2/s1",
         lambda r: _conv_relu_pool_case(r, f32, False, 3, 13, 97, 7, 3, 1, 2, 2, 1, "avg", 2, 1)),
        ("conv_relu_pool fp16 NHWC 1x1 256->64 no bias",
         lambda r: _conv_relu_pool_case(r, f16, True, 32, 256, 64, 56, 1, 1, 0, 1, 1, "none", 1, 1, bias=False)),
        ("conv_relu_pool fp32 NHWC depthwise 7x7 x 2048 ch (taps x groups 100,352)",
         lambda r: _conv_relu_pool_case(r, f32, True, 2, 2048, 2048, 14, 7, 1, 3, 1, 2048, "none", 1, 1)),
        ("conv_transpose bf16 NHWC 64->32 k2 s2 relu 28->56",
         lambda r: _conv_transpose_case(r, b16, True, 32, 64, 32, 28, 2, 2, 0, 0, 1, "relu")),
        ("conv_transpose fp32 NCHW 64->64 k3 s2 p1 op1 groups 2",
         lambda r: _conv_transpose_case(r, f32, False, 32, 64, 64, 28, 3, 2, 1, 1, 2, "none")),
        ("conv_transpose fp16 NCHW 64->32 k2 s2 relu 28->56",
         lambda r: _conv_transpose_case(r, f16, False, 32, 64, 32, 28, 2, 2, 0, 0, 1, "relu")),
        ("conv_batch_stats bf16 NHWC 64->64 3x3 56x56",
         lambda r: _conv_batch_stats_case(r, b16, True, 32, 64, 64, 56, 3, 1, 1)),
        ("conv_batch_stats fp32 NCHW 64->64 3x3 56x56",
         lambda r: _conv_batch_stats_case(r, f32, False, 32, 64, 64, 56, 3, 1, 1)),
        ("conv_batch_stats fp16 NCHW 64->64 3x3 56x56",
         lambda r: _conv_batch_stats_case(r, f16, False, 32, 64, 64, 56, 3, 1, 1)),
    ]
    for i, dt in enumerate(dtypes):
        for cl in (True, False):
            out.append((f"batch_norm {names[dt]} {'NHWC' if cl else 'NCHW'} 32x64x56x56",
                        lambda r, dt=dt, cl=cl: _batch_norm_case(r, dt, cl, 32, 64, 56)))
        out.append((f"optim {names[dt]} params, fp32 state", lambda r, dt=dt: _optim_case(r, dt, f32)))
    out.append(("batch_norm fp64 NCHW 4x13x7x7", lambda r: _batch_norm_case(r, torch.float64, False, 4, 13, 7)))
    out.append(("optim fp64", lambda r: _optim_case(r, torch.float64, torch.float64)))
    return out


# ---------------------------------------------------------------------------------------------------------------
# compiling one recorded launch


_LAUNCHES = []  # filled in the parent before the worker processes fork


def _specialise(kernel, args, kwargs):
    """(ASTSource, options) exactly as ``JITFunction.run`` builds them for these arguments, for sm_90a."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs, debug=kwargs.get("debug", kernel.debug) or False)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = (kernel.fn.__module__, kernel.fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
           repr(sorted(attrs.items())), repr(sorted(options.__dict__.items())))
    return ASTSource(kernel, signature, constexprs, attrs), options, target, key


def _ptxas_counts(log):
    """(registers, spill store bytes, spill load bytes) from a ptxas -v log, Nones where it has none."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else None,
            int(spills.group(2)) if spills else None)


def _ptxas(ptx, arch="sm_90a"):
    """(registers, spill store bytes, spill load bytes) from Triton's bundled ptxas -v."""
    from triton import knobs

    ptxas = knobs.nvidia.ptxas.path  # the ptxas Triton compiles with for sm_90 (knobs: Triton >= 3.4)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    return _ptxas_counts(res.stdout + res.stderr)


def _compile(index):
    import triton

    cases_, kernel, grid, args, kwargs = _LAUNCHES[index]
    row = dict(cases=cases_, kernel=kernel.fn.__name__, grid=list(grid),
               grid_ok=all(0 <= g <= lim for g, lim in zip(grid, GRID_LIMITS)), ok=False)
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        src, options, target, _ = _specialise(kernel, args, kwargs)
        with contextlib.redirect_stdout(log):  # Triton prints its own ptxas -v log (knobs.nvidia.dump_ptxas_log)
            compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as error:  # OutOfResources, a compile error: reported in the row
        row.update(error=f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}")
        row["seconds"] = round(time.perf_counter() - t0, 2)
        return row
    ptx = compiled.asm["ptx"]
    regs, spill_st, spill_ld = _ptxas_counts(log.getvalue())
    if regs is None:  # a Triton without the knob: run its ptxas again
        regs, spill_st, spill_ld = _ptxas(ptx)
    row.update(ok=True, shared=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
               num_stages=compiled.metadata.num_stages, registers=regs, spill_stores=spill_st, spill_loads=spill_ld,
               div_full=len(re.findall(r"\bdiv\.(?:full|approx)\.f32", ptx)),
               div_rn=len(re.findall(r"\bdiv\.rn\.f32", ptx)),
               mma_tf32=bool(re.search(r"\.tf32\b", ptx) and re.search(r"wgmma|mma\.sync", ptx)),
               seconds=round(time.perf_counter() - t0, 2))
    return row


def run(quick=False, jobs=None, only=None):
    """Record every case's launches, compile each distinct one once (``jobs`` processes), return the rows."""
    import torch  # noqa: F401  (before the fork: the workers share the imported modules)

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("sm90_compile needs compiled Triton: run it without TRITON_INTERPRET=1")
    load_kernels()
    try:
        from triton import knobs

        knobs.nvidia.dump_ptxas_log = True  # the register / spill counts of the ptxas run that built the cubin
    except (ImportError, AttributeError):
        pass
    by_key = {}
    refused = []
    for name, fn in cases(quick):
        if only and only not in name:
            continue
        rec = Recorder(name)
        try:
            fn(rec)
        except ValueError as error:  # a launcher refusing a case up front (a clear error) is a result too
            refused.append(dict(cases=[name], kernel="(launcher)", ok=True, refused=str(error)))
            continue
        for case, kernel, grid, args, kwargs in rec.launches:
            key = _specialise(kernel, args, kwargs)[3] + (repr(grid),)
            if key in by_key:
                by_key[key][0].append(case)
            else:
                by_key[key] = ([case], kernel, grid, args, kwargs)
    _LAUNCHES[:] = list(by_key.values())
    jobs = jobs or min(2, os.cpu_count() or 1)
    if jobs > 1 and len(_LAUNCHES) > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            rows = pool.map(_compile, range(len(_LAUNCHES)), chunksize=1)
    else:
        rows = [_compile(i) for i in range(len(_LAUNCHES))]
    return rows + refused


def failures(rows):
    bad = []
    for r in rows:
        if not r["ok"]:
            bad.append(f"{r['kernel']} ({r['cases'][0]}): {r.get('error')}")
        elif "refused" not in r:
            if r["shared"] > SMEM_LIMIT:
                bad.append(f"{r['kernel']} ({r['cases'][0]}): {r['shared']} B shared > {SMEM_LIMIT}")
            if not r["grid_ok"]:
                bad.append(f"{r['kernel']} ({r['cases'][0]}): grid {r['grid']} over CUDA's limits")
    return bad


def table(rows):
    lines = ["| kernel | case (first of n) | shared B | regs | spills st/ld | warps | stages | grid |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["cases"][0])):
        case = r["cases"][0] + (f" (+{len(r['cases']) - 1})" if len(r["cases"]) > 1 else "")
        if "refused" in r:
            lines.append(f"| (launcher) | {case} | refused: {r['refused']} | | | | | |")
        elif not r["ok"]:
            lines.append(f"| {r['kernel']} | {case} | FAILED: {r['error']} | | | | | {r['grid']} |")
        else:
            lines.append(f"| {r['kernel']} | {case} | {r['shared']} | {r['registers']} | {r['spill_stores']}/"
                         f"{r['spill_loads']} | {r['num_warps']} | {r['num_stages']} | {r['grid']} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two headline cases only")
    parser.add_argument("--only", help="cases whose name contains this")
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(args.quick, args.jobs, args.only)
    print(table(rows))
    bad = failures(rows)
    print(f"\n{len(rows)} kernel specialisations compiled for sm_90a in {time.perf_counter() - t0:.0f} s; "
          f"{len(bad)} failures")
    for b in bad:
        print("FAIL", b)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
