"""Builds fastcnn._C: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA build and a CUDA toolkit is
found (no GPU needed). Knobs: FASTCNN_SKIP_CUDA=1, TORCH_CUDA_ARCH_LIST (default "9.0", Hopper), MAX_JOBS, CUDA_HOME.

Build against the torch you will run with: `pip install --no-build-isolation .` (a plain `pip install .` builds in a
throw-away environment with its own torch; fastcnn then warns at import if the versions differ).
"""
import glob
import json
import os
import platform
import re
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from cuda_toolkit import find_cuda_home, wheel_cuda_includes  # noqa: E402  (the one toolkit lookup)


cuda_home = None if os.environ.get("FASTCNN_SKIP_CUDA") == "1" else find_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

with_cuda = bool(cuda_home) and torch.version.cuda is not None
if os.environ.get("FASTCNN_SKIP_CUDA") == "1":
    reason = "FASTCNN_SKIP_CUDA=1"
elif torch.version.cuda is None:
    reason = f"torch {torch.__version__} is not a CUDA build"
elif not cuda_home:
    reason = "no CUDA toolkit found (no nvcc on PATH, no CUDA_HOME)"
else:
    reason = ""

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
extra_compile_args = {"cxx": ["-O3"]}  # py_limited_api=True makes torch define Py_LIMITED_API
extra_link_args = []
if sys.platform.startswith("linux"):
    # at::parallel_for is OpenMP code inlined from ATen's headers: without -fopenmp it runs on one thread. The
    # libgomp.so.1 this links against is the one torch already loaded (same soname), so there is one thread pool.
    extra_compile_args["cxx"].append("-fopenmp")
    extra_link_args.append("-fopenmp")
include_dirs = [os.path.join(ROOT, "csrc", "include")]
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    extra_compile_args["cxx"].append("-DFASTCNN_WITH_CUDA")
    extra_compile_args["nvcc"] = ["-O3", "-DFASTCNN_WITH_CUDA", "--expt-relaxed-constexpr"]
    include_dirs += wheel_cuda_includes(cuda_home)
Extension = CUDAExtension if with_cuda else CppExtension
ext = Extension("fastcnn._C", sources, include_dirs=include_dirs, extra_compile_args=extra_compile_args,
                extra_link_args=extra_link_args, py_limited_api=True)

build_info = {
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "python": platform.python_version(),
    "platform": f"{sys.platform}-{platform.machine()}",
    "cuda": with_cuda,
    "cuda_home": cuda_home if with_cuda else None,
    "cuda_archs": os.environ["TORCH_CUDA_ARCH_LIST"] if with_cuda else None,
    "cuda_skipped_because": reason or None,
    # The op schemas this build compiled: fastcnn.info lists them, and an op newer than the build is reported as a
    # stale build (one warning, then the next backend) rather than failing.
    "ops": sorted(re.findall(r'm\.def\("(\w+)\(', open(os.path.join(ROOT, "csrc", "fastcnn.cpp")).read())),
}


class BuildWithInfo(BuildExtension):
    """Builds the extension and records what was built next to it (fastcnn/_build_info.json)."""

    def run(self):
        cuda = f"yes, archs {build_info['cuda_archs']}" if with_cuda else f"no ({reason})"
        print(f"fastcnn: building the C++ CPU kernels; CUDA kernels: {cuda}")
        super().run()
        targets = [os.path.join(self.build_lib, "fastcnn")]
        if self.inplace:
            targets.append(os.path.join(ROOT, "fastcnn"))
        for folder in targets:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "_build_info.json"), "w") as f:
                json.dump(build_info, f, indent=2)


setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildWithInfo.with_options(no_python_abi_suffix=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
