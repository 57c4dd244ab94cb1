"""Checkpoints: model, optimizer, scheduler, epoch and every RNG state, written atomically and read back with
``torch.load(weights_only=True)``.

Atomic: the bytes go to a temporary file in the same folder, are flushed to disk, and only then renamed over the
target (``os.replace`` is atomic on POSIX and Windows), so a crash mid-write leaves the previous checkpoint intact.
"""
import contextlib
import os
import pickle
import random
import re
import tempfile
import warnings

import numpy as np
import torch

from .model_state import CheckpointError, describe_state_dict


def rng_state():
    """Every RNG a training step can draw from, as tensors and plain numbers (loadable with weights_only=True)."""
    numpy_kind, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    version, python_internal, python_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(python_internal), python_gauss],
        "numpy": [numpy_kind, torch.from_numpy(numpy_keys.astype(np.int64)), numpy_pos, numpy_has_gauss, numpy_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    version, python_internal, python_gauss = state["python"]
    random.setstate((version, tuple(python_internal), python_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _umask():
    mask = os.umask(0)  # the only way to read it is to set it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_write(path, mode="wb", **open_kwargs):
    """Open a temporary file next to ``path`` for writing; when the block ends normally it is flushed, synced and
    renamed over ``path``; when it raises (Ctrl-C included) it is removed. Either the old file or the whole new one.

    Example:
        >>> with atomic_write("run/log.json", "w") as file:
        ...     json.dump(history, file)
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, mode, **open_kwargs) as file:
            os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp's 0600 would outlive the rename; give open()'s mode
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        # A Ctrl-C that lands just after os.replace finds no temporary left: nothing to remove then.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def save_checkpoint(path, state):
    """Write ``state`` (a dict of state_dicts, numbers and tensors) to ``path`` atomically.

    Args:
        path (str): the checkpoint file; its folder is created if missing.
        state (dict): what to save, e.g. :meth:`fastcnn.train.Trainer.state_dict`.
    """
    with atomic_write(path) as file:
        torch.save(state, file)


def load_checkpoint(path, map_location="cpu", required=()):
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code is unpickled).

    Args:
        path (str): the file.
        map_location: where tensors go (default CPU, so a GPU run's checkpoint loads anywhere).
        required: top-level keys the checkpoint must have (e.g. ``("model",)``).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is truncated, not a PyTorch checkpoint, holds pickled objects other than tensors
            and containers, or lacks a ``required`` key; the message says which.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist" + (" (it is a folder)" if os.path.isdir(path)
                                                                           else ""))
    try:
        with warnings.catch_warnings():  # the unpickler's protocol warnings about a file it then rejects anyway
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message advises weights_only=False, i.e. running whatever code the file carries: never repeated.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"a pickled {found.group(1)}" if found else "pickled Python data (not tensors and containers)"
        raise CheckpointError(f"{path!r} is not a fastcnn checkpoint: it holds {what}, which fastcnn does not "
                              "load (it loads tensors, numbers and containers only, never pickled code)") from None
    except Exception as error:  # garbage bytes fail anywhere in the unpickler: KeyError, EOFError, RuntimeError, ...
        raise CheckpointError(f"cannot read checkpoint {path!r}: truncated or not a PyTorch checkpoint "
                              f"({type(error).__name__}: {_first_line(error)})") from None
    missing = [key for key in required if not isinstance(state, dict) or key not in state]
    if missing:
        lacks = ", ".join(map(repr, missing))
        raise CheckpointError(f"{path!r} is not a checkpoint of `fastcnn train`: it lacks {lacks}; it holds "
                              f"{_describe_content(state)}")
    return state


def _first_line(error):
    lines = [line for line in str(error).splitlines() if line.strip() and "weights_only" not in line]
    return lines[0].strip().split(". ")[0][:160] if lines else "no details"  # torch's first sentence says it


def _describe_content(state):
    if not isinstance(state, dict):
        return f"a {type(state).__name__}"
    if state and all(isinstance(value, torch.Tensor) for value in state.values()):
        model = describe_state_dict(state)
        return f"a bare model state_dict{f' ({model})' if model else ''} with no training state"
    keys = list(state)
    return f"the keys {', '.join(map(str, keys[:6]))}{', ...' if len(keys) > 6 else ''}"


def seed_everything(seed, deterministic=False):
    """Seed torch (CPU and CUDA), Python's ``random`` and NumPy; with ``deterministic``, also make torch use
    deterministic algorithms only (cuDNN benchmark off; ops without a deterministic version raise)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.benchmark = False
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's requirement for determinism
