"""`python -m fastcnn.info`: what was built, and which backend can serve each op here (and why the others cannot)."""
import platform

import torch

from . import _extension
from .ops import BACKENDS, MODULE_TABLES, TABLES

OPS = tuple(TABLES)  # every op the report covers: one per route table


def _routes(table, device, last="reference", label=None):
    """The route table's entries for `device` tensors, in order: 'backend [measured]' (or `label` for every entry's
    backend), then what runs where none matches."""
    entries = [f"{label or r.backend} [{r.measured}]" + "".join(f" {k}={v}" for k, v in r._asdict().items()
                                                       if k not in ("backend", "measured", "device") and v)
               for r in table.routes if r.device in (None, device)]
    return " -> ".join(entries + [last])


def report():
    """The report as text."""
    info = _extension.build_info()
    lines = [f"fastcnn {__import__('fastcnn').__version__}",
             f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
             f"triton {_triton_version()}",
             f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}"]
    if info is None:
        lines.append("build: fastcnn._C not built")
    else:
        cuda = f"yes, archs {info['cuda_archs']}" if info["cuda"] else f"no ({info['cuda_skipped_because']})"
        lines.append(f"build: torch {info['torch']}, python {info['python']}, {info['platform']}; CUDA kernels: {cuda}")
    lines.append(f"fastcnn._C: {'loaded' if _extension.LOADED else _extension.WHY_NOT_LOADED}")
    compiled = _extension.compiled_ops()
    if compiled is not None:
        lines.append(f"compiled ops: {', '.join(compiled)}")
    for op in OPS:
        lines.append(f"\n{op} (backends for CPU and CUDA tensors):")
        for device in ("cpu", "cuda"):
            lines.append(f"  {device:4} route: {_routes(TABLES[op], device)}")
            for backend in BACKENDS:
                reason = TABLES[op].why_not(backend, device)
                lines.append(f"  {device:4} {backend:9} {'available' if reason is None else 'unavailable: ' + reason}")
    for module, table in MODULE_TABLES.items():
        lines.append(f"\n{module} (runs its stock layers where measured slower than them):")
        for device in ("cpu", "cuda"):
            lines.append(f"  {device:4} route: {_routes(table, device, last='fused', label='stock')}")
    if not torch.cuda.is_available():
        lines.append("(no CUDA device here: the cuda rows say what CUDA tensors would get on a GPU machine)")
    return "\n".join(lines)


def _triton_version():
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


if __name__ == "__main__":
    print(report())
