#!/usr/bin/env python
"""Registers, spills and shared memory of every fastcnn CUDA kernel, from ptxas, without a GPU.

Compiles each csrc/cuda/*.cu to a device-only cubin (`nvcc -cubin -Xptxas -v`: no host compilation, so it is much
quicker than the extension build) with the extension's device flags, into a temporary folder, and prints one row per
kernel instantiation: registers per thread, spill stores/loads, stack frame, static shared memory, constant memory.

    python scripts/cuda_resources.py [--arch 90a] [--jobs N] [--json FILE] [FILE.cu ...]

Spills. ptxas counts as spills both register pressure and the ABI's register saves around a subroutine call (ptxas
calls subroutines for 64-bit integer division and for the rare slow path of IEEE float division). A spilling
kernel's SASS (cuobjdump, from the CUDA toolkit or Triton's bundled one) says which: a kernel with a CALL whose
spills stay within CALL_SAVE_LIMIT bytes is listed as "call-save", not as a problem.

Exit status 1 when a kernel spills (other than call saves) or its static shared memory exceeds what a block may
declare (48 KB), 2 when nvcc is missing or fails.
tests/gpu/test_cuda_resources.py runs it where nvcc is present (CI included).
"""
import argparse
import concurrent.futures
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_toolkit import find_nvcc, wheel_cuda_includes  # noqa: E402  (setup.py's toolkit lookup)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALL_SAVE_LIMIT = 64  # bytes of spill stores that a subroutine call's register saves may account for
STATIC_SMEM_LIMIT = 48 * 1024  # bytes a kernel may declare statically (__shared__ arrays), on every architecture
DYNAMIC_SMEM_LIMIT = {"90": 232448, "90a": 232448, "100": 232448, "80": 166912, "89": 101376, "86": 101376}


def include_dirs(nvcc):
    """The extension's include folders: fastcnn's, torch's, the CUDA toolkit's, the nvidia wheels' (cusparse.h)."""
    cuda_home = os.path.dirname(os.path.dirname(nvcc))
    os.environ.setdefault("CUDA_HOME", cuda_home)  # torch's guess may be wrong
    from torch.utils.cpp_extension import include_paths

    dirs = [os.path.join(ROOT, "csrc", "include"), *wheel_cuda_includes(cuda_home)]
    cuda_include = os.path.join(cuda_home, "include")
    dirs += include_paths(device_type="cuda") if "device_type" in include_paths.__code__.co_varnames else \
        include_paths(cuda=True)
    dirs += [cuda_include, sysconfig.get_paths()["include"]]
    return dirs


def nvcc_command(nvcc, source, cubin, arch):
    # The same device flags as setup.py's build (torch.utils.cpp_extension adds the __CUDA_NO_* ones).
    flags = ["-O3", "-DFASTCNN_WITH_CUDA", "--expt-relaxed-constexpr", "-std=c++20", "-D__CUDA_NO_HALF_OPERATORS__",
             "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
             "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
             f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    incs = [f"-I{d}" for d in include_dirs(nvcc)]
    return [nvcc, "-cubin", "-Xptxas", "-v", *flags, *incs, source, "-o", cubin]


# ptxas -v prints, per kernel:
#   ptxas info    : Compiling entry function '_ZN...' for 'sm_90a'
#   ptxas info    : Function properties for _ZN...
#       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 448 bytes cmem[0]
ENTRY = re.compile(r"Compiling entry function '([^']+)'")
PROPS = re.compile(r"Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")
CMEM = re.compile(r"(\d+) bytes cmem\[0\]")


def parse_ptxas(text):
    """{mangled kernel name: {registers, spill_stores, spill_loads, stack, smem, cmem}} of the entry functions."""
    kernels, props = {}, {}
    current, props_of = None, None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            current, props_of = m.group(1), None
            kernels.setdefault(current, {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0,
                                         "smem": 0, "cmem": 0})
        elif m := PROPS.search(line):
            props_of = m.group(1)
        elif (m := FRAME.search(line)) and props_of is not None:
            props[props_of] = tuple(int(g) for g in m.groups())
        elif (m := USED.search(line)) and current is not None:
            k = kernels[current]
            k["registers"] = int(m.group(1))
            if s := SMEM.search(line):
                k["smem"] = int(s.group(1))
            if c := CMEM.search(line):
                k["cmem"] = int(c.group(1))
    for name, k in kernels.items():
        if name in props:
            k["stack"], k["spill_stores"], k["spill_loads"] = props[name]
    return kernels


def demangle(names):
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled):
    """'void fastcnn::(anonymous namespace)::forward_kernel<float, 4, true, unsigned int>(...)' ->
    'forward_kernel<float, 4, true, unsigned int>' (namespaces and the parameter list dropped)."""
    name = demangled
    if name.startswith("void "):
        name = name[5:]
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # the parameter list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not name[i:].startswith("(anonymous"):
            cut = i
            break
    name = name[:cut].replace("(anonymous namespace)::", "")
    for ns in ("fastcnn::optim_cuda::", "fastcnn::mta::", "fastcnn::", "c10::", "at::"):
        name = name.replace(ns, "")
    return name


def find_cuobjdump(nvcc):
    candidates = [os.path.join(os.path.dirname(nvcc), "cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if os.path.isfile(c)), shutil.which("cuobjdump"))


def functions_with_calls(cuobjdump, cubin):
    """Mangled names of the cubin's functions whose SASS has a CALL; None when it cannot be disassembled."""
    if cuobjdump is None:
        return None
    proc = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    calls, current = set(), None
    for line in proc.stdout.splitlines():
        if m := re.match(r"\s*Function : (\S+)", line):
            current = m.group(1)
        elif current and re.search(r"\bCALL\.", line):
            calls.add(current)
    return calls


def compile_one(nvcc, source, arch, tmp):
    cubin = os.path.join(tmp, os.path.basename(source) + ".cubin")
    start = time.monotonic()
    proc = subprocess.run(nvcc_command(nvcc, source, cubin, arch), capture_output=True, text=True)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source} (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    kernels = parse_ptxas(proc.stderr + proc.stdout)
    if any(k["spill_stores"] or k["spill_loads"] for k in kernels.values()):
        calls = functions_with_calls(find_cuobjdump(nvcc), cubin)
        for name, k in kernels.items():
            k["calls"] = None if calls is None else name in calls
    return source, seconds, kernels


def report(sources, arch="90a", jobs=None):
    """[(file, seconds, [(kernel, stats), ...]), ...] for the given .cu files."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    jobs = jobs or max(1, min(len(sources), os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="fastcnn-ptxas-") as tmp:
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(lambda s: compile_one(nvcc, s, arch, tmp), sources))
    rows = []
    for source, seconds, kernels in results:
        names = demangle(sorted(kernels))
        rows.append((os.path.relpath(source, ROOT), seconds,
                     sorted(((short_name(names[k]), v) for k, v in kernels.items()), key=lambda r: r[0])))
    return rows


def is_call_save(k):
    """Spills that are the register saves around a subroutine call (see the module docstring)."""
    return bool(k.get("calls")) and k["spill_stores"] <= CALL_SAVE_LIMIT


def problems(rows, arch="90a"):
    """Lines naming each kernel that spills or declares more static shared memory than a block may."""
    found = []
    for source, _, kernels in rows:
        for name, k in kernels:
            if (k["spill_stores"] or k["spill_loads"]) and not is_call_save(k):
                found.append(f"{source}: {name} spills {k['spill_stores']} B stores / {k['spill_loads']} B loads")
            if k["smem"] > min(STATIC_SMEM_LIMIT, DYNAMIC_SMEM_LIMIT.get(arch, STATIC_SMEM_LIMIT)):
                found.append(f"{source}: {name} declares {k['smem']} B of shared memory")
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", help="default: csrc/cuda/*.cu")
    parser.add_argument("--arch", default="90a", help="compute capability without the dot (default 90a: Hopper)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel nvcc processes (default: cores)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    sources = args.sources or sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    try:
        rows = report([os.path.abspath(s) for s in sources], args.arch, args.jobs)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"cuda_resources: {e}", file=sys.stderr)
        return 2
    width = max((len(n) for _, _, ks in rows for n, _ in ks), default=10)
    print(f"{'kernel (sm_' + args.arch + ')':<{width}}  regs  spill st/ld  stack   smem")
    for source, seconds, kernels in rows:
        print(f"# {source}: {len(kernels)} kernels, compiled in {seconds:.0f} s")
        for name, k in kernels:
            note = "  call-save" if (k["spill_stores"] or k["spill_loads"]) and is_call_save(k) else ""
            print(f"{name:<{width}}  {k['registers']:>4}  {k['spill_stores']:>5}/{k['spill_loads']:<5}  "
                  f"{k['stack']:>5}  {k['smem']:>5}{note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"file": s, "seconds": t, "kernels": dict(ks)} for s, t, ks in rows], f, indent=1)
    bad = problems(rows, args.arch)
    for line in bad:
        print(f"PROBLEM: {line}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
