"""Checkpoints: model, optimizer, scheduler, epoch and every RNG state, written atomically and read back with
``torch.load(weights_only=True)``.

Atomic: the bytes go to a temporary file in the same folder, are flushed to disk, and only then renamed over the
target (``os.replace`` is atomic on POSIX and Windows), so a crash mid-write leaves the previous checkpoint intact.
"""
import os
import random
import tempfile

import numpy as np
import torch


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


def save_checkpoint(path, state):
    """Write ``state`` (a dict of state_dicts, numbers and tensors) to ``path`` atomically.

    Args:
        path (str): the checkpoint file; its folder is created if missing.
        state (dict): what to save, e.g. :meth:`fastcnn.train.Trainer.state_dict`.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code is unpickled)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


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
