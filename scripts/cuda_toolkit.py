"""Where the CUDA toolkit is: the one lookup of setup.py (which builds with it) and scripts/cuda_resources.py (which
checks the kernels with the same nvcc and headers). Standard library only, as setup.py imports it before torch and
before fastcnn is installed; both put this folder on sys.path to import it."""
import glob
import importlib.util
import os
import re
import shutil


def find_cuda_home():
    """The real CUDA toolkit folder, or None. CUDA_HOME / CUDA_PATH when set, else the toolkit of the `nvcc` on PATH,
    which may be a wrapper script that execs the real compiler from elsewhere (torch's guess, the wrapper's parent
    folder, is then wrong, so the wrapper is followed)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.isdir(os.environ[var]):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    nvcc = os.path.realpath(nvcc)
    with open(nvcc, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"#!"):
        match = re.search(rb"(/\S+)/bin/nvcc\b", head)
        if match and os.path.isfile(match.group(1).decode() + "/bin/nvcc"):
            return match.group(1).decode()
    return os.path.dirname(os.path.dirname(nvcc))


def find_nvcc():
    """The toolkit's nvcc (the one the build compiles with), or None."""
    home = find_cuda_home()
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    return nvcc if nvcc and os.path.isfile(nvcc) else None


def wheel_cuda_includes(cuda_home):
    """Include folders of the nvidia-* wheels a CUDA build of torch depends on, when the toolkit lacks the library
    headers (cusparse.h, cublas_v2.h, ...) that ATen's CUDA headers include (a bare toolkit); else []."""
    if os.path.isfile(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isfile(os.path.join(d, "cusparse.h")) or os.path.isfile(
        os.path.join(d, "cublas_v2.h"))]
