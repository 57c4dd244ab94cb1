"""Loads the compiled extension fastcnn._C, never failing: a missing or mismatched build gives one warning and
leaves the C++/CUDA backends unavailable, with the reason kept for `python -m fastcnn.info`."""
import importlib
import json
import os
import warnings

import torch

_BUILD_INFO_PATH = os.path.join(os.path.dirname(__file__), "_build_info.json")


def build_info():
    """What setup.py recorded about the build (versions, archs, CUDA or not), or None when nothing was built."""
    try:
        with open(_BUILD_INFO_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _release(version):
    """'2.14.1+cu130' -> '2.14.1': the part of a torch version that fixes its C++ ABI."""
    return version.split("+")[0]


def _load():
    info = build_info()
    if info is None:
        return False, "fastcnn._C is not built (install with `pip install --no-build-isolation -e .`)"
    if _release(info["torch"]) != _release(torch.__version__):
        return False, (f"fastcnn._C was built for torch {info['torch']} but torch {torch.__version__} is installed; "
                       "rebuild with `pip install --no-build-isolation -e .`")
    try:
        importlib.import_module("fastcnn._C")
    except (ImportError, OSError) as error:
        return False, f"fastcnn._C failed to load: {error}"
    return True, None


LOADED, WHY_NOT_LOADED = _load()
WITH_CUDA = LOADED and bool(build_info()["cuda"])
if not LOADED and os.environ.get("FASTCNN_QUIET") != "1":
    warnings.warn(f"{WHY_NOT_LOADED}. Falling back to the Triton/reference backends.", RuntimeWarning, stacklevel=2)


def has_kernel(op, backend):
    """Whether the loaded fastcnn._C has a `backend` ("cpu" or "cuda") kernel for fastcnn::`op`. A build from older
    sources lacks the ops added since (its recorded ``ops``, see `compiled_ops`, say which it has)."""
    if not LOADED:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastcnn::{op}", backend.upper())
    except RuntimeError:  # no such schema
        return False


def compiled_ops():
    """The fastcnn:: op schemas the build compiled, as setup.py recorded them (None for a build from before the
    record, or no build)."""
    info = build_info()
    return None if info is None else info.get("ops")
