"""MedMNIST ``.npz`` files: ``{train,val,test}_images`` (uint8, (N,H,W) or (N,H,W,3)) and ``{...}_labels`` ((N,L))."""
import os

import numpy as np
import torch
from torch.utils.data import TensorDataset

SPLITS = ("train", "val", "test")
# ITU-R 601 luma weights, as PIL's RGB -> "L" conversion.
LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


def medmnist_npz(path, split="train", channels=None):
    """One split of a MedMNIST npz file as a dataset of ``(image, label)``.

    Args:
        path (str): the ``.npz`` file (e.g. ``pathmnist_64.npz``); nothing is downloaded.
        split (str): ``"train"``, ``"val"`` or ``"test"``.
        channels (int or None): 1 or 3 to convert to; None keeps the file's (1 for (N,H,W), 3 for (N,H,W,3)).

    Shape:
        images ``(channels, H, W)`` float32 in [-1, 1]; labels int64: the class for single-label files ((N,1)),
        the 0/1 vector for multi-label files ((N,L), L > 1).

    Example:
        >>> train = medmnist_npz("pathmnist_28.npz", "train")
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MedMNIST file {path!r} does not exist")
    try:
        archive = np.load(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read MedMNIST file {path!r}: {error}") from error
    with archive:
        wanted = (f"{split}_images", f"{split}_labels")
        missing = [key for key in wanted if key not in archive.files]
        if missing:
            raise KeyError(f"MedMNIST file {path!r} lacks {missing}; it has {sorted(archive.files)}")
        images, labels = archive[wanted[0]], archive[wanted[1]]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise ValueError(f"{path!r}: {split}_images must be (N,H,W) or (N,H,W,3), got {images.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{path!r}: {len(images)} {split}_images but {len(labels)} {split}_labels")
    tensor = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)
    tensor = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    if channels is not None and channels != tensor.shape[1]:
        tensor = tensor.expand(-1, 3, -1, -1) if channels == 3 else (tensor * LUMA).sum(1, keepdim=True)
    labels = torch.from_numpy(labels.astype(np.int64)).reshape(len(labels), -1)
    dataset = TensorDataset(tensor.contiguous(), labels[:, 0] if labels.shape[1] == 1 else labels)
    dataset.classes = [str(c) for c in range(int(labels.max()) + 1)] if labels.shape[1] == 1 else None
    return dataset
