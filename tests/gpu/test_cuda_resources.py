"""CI check of the CUDA kernels without a GPU (issue 15, "Check in CI, without a GPU"): every csrc/cuda/*.cu compiles
for Hopper (sm_90a) with the extension's device flags, and ptxas reports, per kernel instantiation, its registers and
no spills (beyond the register saves around a subroutine call, see scripts/cuda_resources.py) and static shared
memory within what a block may declare. Runs wherever nvcc and a CUDA build of torch are present (CI included), no GPU
needed; the table is printed (pytest -s, or the script itself)."""
import glob
import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("cuda_resources", os.path.join(ROOT, "scripts", "cuda_resources.py"))
cuda_resources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_resources)

SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
pytestmark = [
    pytest.mark.skipif(torch.version.cuda is None, reason="torch is not a CUDA build (no ATen CUDA headers)"),
    pytest.mark.skipif(cuda_resources.find_nvcc() is None, reason="nvcc not found"),
]


@pytest.fixture(scope="module")
def rows():
    return cuda_resources.report(SOURCES, "90a")


def test_every_cuda_file_compiles_for_hopper_with_kernels(rows):
    assert [r[0] for r in rows] == [os.path.relpath(s, ROOT) for s in SOURCES]
    for source, seconds, kernels in rows:
        print(f"{source}: {len(kernels)} kernels, {seconds:.0f} s")
        assert kernels, f"{source}: no kernel compiled"


def test_no_spills_and_shared_memory_within_the_limit(rows):
    for source, _, kernels in rows:
        for name, k in kernels:
            print(f"{source} {name}: {k['registers']} regs, spills {k['spill_stores']}/{k['spill_loads']} B, "
                  f"{k['smem']} B smem")
    assert cuda_resources.problems(rows, "90a") == []


def test_the_32_bit_index_paths_exist_beside_the_64_bit_ones(rows):
    """Issue 15.10: the elementwise kernels come in a 32-bit IntDivider instantiation (used below 2^31 elements)
    beside the 64-bit fallback (tests/gpu/test_cuda_large.py runs the latter on a GPU)."""
    kernels = {name: k for _, _, ks in rows for name, k in ks}
    for family in ("apply_kernel", "elemt_kernel", "partial_kernel", "store_kernel", "phase_store_kernel",
                   "forward_kernel", "backward_kernel"):
        narrow = [n for n in kernels if n.startswith(family + "<") and "unsigned int" in n]
        wide = [n for n in kernels if n.startswith(family + "<") and ("long" in n or "int64" in n)]
        assert narrow and wide, f"{family}: 32-bit {len(narrow)}, 64-bit {len(wide)} instantiations"
