"""Shared benchmark machinery (protocol: shared/BENCHMARKS.md): environment banner, the two ceilings, timing,
correctness against a float64 oracle, saved-activation and peak memory, roofline fraction, and the JSON writer.

The timing itself is in _timing.py; the suites reach it through this module (``H.bench_all``, ``H.set_ratios``, ...).
"""
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

import torch

from _timing import (  # noqa: F401  (the suites reach the timing as H.<name>)
    BUSY_CORES,
    ROUNDS,
    bench,
    bench_all,
    cache_flusher,
    cuda_graphed,
    paired_ratio,
    set_ratios,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
SCHEMA_VERSION = 1


# ----------------------------------------------------------------------------------------------- environment

def _git_commit():
    try:
        run = lambda *a: subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True, timeout=10)  # noqa
        commit = run("rev-parse", "HEAD")
        if commit.returncode != 0:
            return "unknown (not a git checkout)"
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return commit.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available)"


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _fastcnn_build():
    """What setup.py recorded about the compiled extension, and whether it loaded (a stale or missing build is not
    visible in the commit)."""
    import fastcnn
    ext = fastcnn._extension
    return {"info": ext.build_info(), "loaded": ext.LOADED, "why_not": ext.WHY_NOT_LOADED}


def environment(device):
    """Everything that makes a number reproducible: machine, versions, commit, build, threads, load."""
    env = {
        "device_type": device.type,
        "cpu_model": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fastcnn": _version("fastcnn"),
        "fastcnn_commit": _git_commit(),
        "fastcnn_build": _fastcnn_build(),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}", driver=_nvidia_driver(),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   cudnn_benchmark=torch.backends.cudnn.benchmark,
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    else:
        env.update(device_name=env["cpu_model"], driver=None, cuda=None)
    return env


def wait_for_quiet(max_wait_s, threshold=0.5, poll_s=60):
    """Waits (polling every ``poll_s``) until the 1-minute load average is below ``threshold`` or ``max_wait_s``
    has passed, so other work on the machine does not pollute the timings. Returns the seconds waited."""
    start = time.monotonic()
    while os.getloadavg()[0] >= threshold and time.monotonic() - start < max_wait_s:
        print(f"load average {os.getloadavg()[0]:.2f} >= {threshold}: waiting {poll_s}s for a quiet machine",
              flush=True)
        time.sleep(poll_s)
    return round(time.monotonic() - start)


def device_slug(env):
    """'nvidia-h100-80gb-hbm3', 'cpu-amd-epyc': the device part of a result file's name."""
    name = ("cpu " if env["device_type"] == "cpu" else "") + env["device_name"]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def banner(env, ceilings):
    lines = [f"device  {env['device_type']}: {env['device_name']}  (driver {env['driver']}, CUDA {env['cuda']})",
             f"torch {env['torch']}  triton {env['triton']}  fastcnn {env['fastcnn']} @ {env['fastcnn_commit']}",
             f"CPU {env['cpu_model']} ({env['cpu_capability']}), {env['cpu_threads']} threads, "
             f"load average {env['load_average_start'][0]:.2f}",
             f"ceilings: copy {ceilings['copy_gbps']:.1f} GB/s; matmul " +
             ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in ceilings["matmul_tflops"].items())]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- timing

def time_providers(row, timed, device, timing, work, ceilings, dtype):
    """Times a row's providers against each other (``timed``: name -> step; `bench_all`) and adds each one's times
    and roofline fraction (``work`` = (flops, bytes)) to ``row["providers"][name]``."""
    flops, nbytes = work
    for name, result in bench_all(timed, device, warmup=1, **timing).items():
        result["roofline"] = roofline_fraction(flops, nbytes, result["median_ms"], ceilings, dtype)
        row["providers"][name].update(result)


# -------------------------------------------------------------------------------------------------- ceilings

def _copy_gbps(device, n, retries):
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, budget_s=0.5, retries=retries)
    return 2 * src.nbytes / (t["median_ms"] * 1e-3) / 1e9


def measure_ceilings(device, dtypes, retries=3):
    """The two roofline ceilings, measured now: copy bandwidth (GB/s, read + write counted) of a large
    device-to-device copy, and matmul throughput (TFLOP/s) for each dtype benchmarked. On GPU, float32 is measured
    with TF32 allowed, as cuDNN convolutions use it by default."""
    n = (256 << 20) if device.type == "cuda" else (64 << 20)  # 1 GiB / 256 MiB of float32
    copy_gbps = _copy_gbps(device, n, retries)
    size = 8192 if device.type == "cuda" else 2048
    tflops = {}
    for dtype in dtypes:
        a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda"
        try:
            t = bench(lambda: a @ b, device, budget_s=1.0, min_reps=3, retries=retries)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        tflops[str(dtype).replace("torch.", "")] = 2 * size**3 / (t["median_ms"] * 1e-3) / 1e12
    return {"copy_gbps": copy_gbps, "copy_bytes": n * 4,
            "matmul_tflops": tflops, "matmul_size": size}


def roofline_fraction(flops, nbytes, median_ms, ceilings, dtype):
    """max(FLOPs / matmul peak, bytes / copy bandwidth) / measured time: 1.0 = at the roofline bound."""
    peak = ceilings["matmul_tflops"][str(dtype).replace("torch.", "")] * 1e12
    bound_s = max(flops / peak, nbytes / (ceilings["copy_gbps"] * 1e9))
    return bound_s / (median_ms * 1e-3)


# ----------------------------------------------------------------------------------------- correctness, memory

class WithBackend(torch.nn.Module):
    """Runs ``module`` with fastcnn forced onto one backend (the backward follows the forward's backend)."""

    def __init__(self, module, backend):
        super().__init__()
        self.module, self.backend = module, backend

    def forward(self, x):
        import fastcnn  # the harness itself needs no fastcnn: only this provider wrapper does

        with fastcnn.use_backend(self.backend):
            return self.module(x)


QUICK_RES_SCALE = 0.25  # --quick in the layer-level suites: resolutions scaled by at most this


def layer_suite_args(description, default_batch, argv=None, sweep=None):
    """The command line shared by the layer-level suites (residual blocks, transposed convolution); ``sweep``: the
    help of the suite's --sweep flag, where it has one."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help=f"batch size (default: {default_batch})")
    parser.add_argument("--res-scale", type=float, default=1.0, help="scale each case's resolution")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timed repeats per provider")
    parser.add_argument("--quick", action="store_true",
                        help=f"batch 1 (unless --batch), resolutions x{QUICK_RES_SCALE} at most, no retries: a "
                        "smoke run")
    parser.add_argument("--retries", type=int, help="CPU: repeats of a series disturbed by other work "
                        "(default 3; 0 with --quick)")
    parser.add_argument("--out", help="results folder (default: benchmarks/results)")
    if sweep:
        parser.add_argument("--sweep", action="store_true", help=sweep)
    parser.set_defaults(sweep=False)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.res_scale = args.batch or 1, min(args.res_scale, QUICK_RES_SCALE)
    if args.retries is None:
        args.retries = 0 if args.quick else 3
    return args


def begin_run(args, dtype):
    """(device, environment, ceilings) for a run on ``args.device``: cudnn.benchmark on GPU as eager users set it,
    the two ceilings measured in ``dtype``, and the banner printed."""
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    env = environment(device)
    ceilings = measure_ceilings(device, [dtype], args.retries)
    print(banner(env, ceilings), flush=True)
    return device, env, ceilings


def finish_row(row, baselines=("eager", "compile")):
    """Adds each fastcnn provider's ratios (baseline time / fastcnn time, paired round by round on CPU: `set_ratios`;
    None when its result was wrong) with their spread, and the row's status: "ok" only when every fastcnn provider
    passed the correctness check."""
    fastcnn_names = [n for n in row["providers"] if n.startswith("fastcnn")]
    for n in fastcnn_names:
        set_ratios(row, n, baselines, row["providers"][n]["ok"])
    row["status"] = "ok" if all(row["providers"][n]["ok"] for n in fastcnn_names) else "failed"
    return row


def describe_row(label, row, provider_extra=lambda result: ""):
    """Two console lines for a layer-suite row: each provider's median (and WRONG when its check failed), then each
    fastcnn provider's ratios and the row's status."""
    times = " | ".join(f"{name} {r['median_ms']:.2f} ms{'' if r['ok'] else ' WRONG'}{provider_extra(r)}"
                       for name, r in row["providers"].items())
    ratios = "; ".join(f"{n} " + ", ".join(f"x{v:.2f} vs {b}" for b, v in vs.items() if v)
                       for n, vs in row["ratios"].items())
    return f"{label}: {times}\n    {ratios} [{row['status']}]"


def run_cases(suite, args, env, ceilings, notes, cases, measure_case, describe):
    """Measures each case of ``cases`` (built lazily, one at a time), printing it and rewriting the results file after
    every row so a killed run keeps what it measured. Returns the exit status: 1 when any row failed its check."""
    for note in notes:
        print("note:", note)
    suite += "_quick" if args.quick else ""  # a smoke run never overwrites the full run's file
    rows = []
    for case in cases:
        rows.append(measure_case(case))
        print(describe(rows[-1]), flush=True)
        write_results(suite, env, ceilings, rows, args.out, notes, complete=False)
    print(f"wrote {write_results(suite, env, ceilings, rows, args.out, notes)}")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


def checked_first_call(step, stock_out, reference, dtype, device):
    """Runs one provider's ``step`` once (it compiles, where there is anything to compile), timed as
    ``first_call_s``, and checks what it returns against the float64 ``reference`` with stock's outputs
    ``stock_out`` as the yardstick (None: this is stock, checked against itself). -> (outputs, result)."""
    start = time.perf_counter()
    got = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result = {"first_call_s": time.perf_counter() - start}
    result.update(check(got, got if stock_out is None else stock_out, reference[:len(got)], dtype))
    return got, result


def _rel_rms(x, ref):
    return ((x - ref).square().mean().sqrt() / ref.square().mean().sqrt().clamp_min(1e-30)).item()


def check(got, stock, ref, dtype):
    """Errors of ``got`` and of stock PyTorch ``stock`` against a float64 oracle ``ref`` (tuples of tensors).
    ``ok`` when, for every tensor, got's relative RMS error is at most 2x stock's plus one unit of the dtype's
    epsilon (flash-attention's rule). RMS rather than max decides, because a near-tie in a pool window may
    legitimately pick the other element in either implementation; the max absolute error is recorded too, and
    ``err_vs_stock``, the worst ratio of got's relative error to stock's."""
    eps = torch.finfo(dtype).eps
    result = {"max_abs_err": 0.0, "rel_rms_err": 0.0, "err_vs_stock": 0.0, "ok": True}
    for g, s, r in zip(got, stock, ref):
        g, s = g.double(), s.double()
        rel_g, rel_s = _rel_rms(g, r), _rel_rms(s, r)
        finite = bool(torch.isfinite(g).all())
        result["ok"] = result["ok"] and finite and rel_g <= 2 * rel_s + eps
        result["max_abs_err"] = max(result["max_abs_err"], (g - r).abs().max().item() if finite else float("inf"))
        result["rel_rms_err"] = max(result["rel_rms_err"], rel_g if finite else float("inf"))
        result["err_vs_stock"] = max(result["err_vs_stock"], rel_g / max(rel_s, 1e-30) if finite else float("inf"))
    return result


def saved_tensor_bytes(forward, held=()):
    """Bytes autograd keeps for backward during ``forward()`` (each storage counted once): total, and activations
    only (storages of ``held`` tensors - inputs and parameters the caller keeps anyway - left out)."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    held_ptrs = {t.untyped_storage().data_ptr() for t in held}
    del out
    return {"total": sum(storages.values()),
            "activations": sum(n for ptr, n in storages.items() if ptr not in held_ptrs)}


def peak_step_bytes(step, reset, device):
    """Peak memory allocated above the resting level during one ``step()`` (GPU only; None on CPU)."""
    if device.type != "cuda":
        return None
    reset()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


# ------------------------------------------------------------------------------------------------------- output

def disturbed_note(timings):
    """A note on the CPU timings (dicts from ``bench``) during which other processes were busy, or None."""
    disturbed = [t for t in timings if t.get("other_cpu", 0) > BUSY_CORES]
    if not disturbed:
        return None
    return (f"{len(disturbed)} of {len(timings)} timings ran while other processes used more than {BUSY_CORES} "
            "cores (`other_cpu`, marked ‡): those numbers are suspect")


def _without_rounds(value):
    """A copy of ``value`` (rows) without the per-round times (`ROUNDS`): they served the ratios, the file keeps the
    quantiles."""
    if isinstance(value, dict):
        return {k: _without_rounds(v) for k, v in value.items() if k != ROUNDS}
    if isinstance(value, list):
        return [_without_rounds(v) for v in value]
    return value


def write_results(suite, env, ceilings, rows, out_dir=None, notes=(), complete=True):
    """Writes ``<out_dir>/<YYYY-MM-DD>_<device-slug>_<suite>.json`` and returns its path. ``complete=False`` marks a
    run still going or aborted (written after every case, so a killed run leaves what it measured)."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    env = dict(env, load_average_end=list(os.getloadavg()),
               finished=datetime.datetime.now().isoformat(timespec="seconds"))
    name = f"{datetime.date.today().isoformat()}_{device_slug(env)}_{suite}.json"
    path = os.path.join(out_dir, name)
    payload = {"schema": SCHEMA_VERSION, "suite": suite, "complete": complete, "environment": env,
               "ceilings": ceilings, "notes": list(notes), "rows": _without_rounds(rows)}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    return path
