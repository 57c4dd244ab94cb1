"""MedMNIST ``.npz`` files: ``{train,val,test}_images`` (uint8, (N,H,W) or (N,H,W,3)) and ``{...}_labels`` ((N,L))."""
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")
# ITU-R 601 luma weights, as PIL's RGB -> "L" conversion.
LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)


class MedMNISTSplit(Dataset):
    """One split of a MedMNIST file, kept as uint8 and converted per item: scaled to [-1, 1], converted to
    ``channels`` and resized to ``image_size``. Per item because a resized float copy of a whole split can be many
    times the file's size (PathMNIST's 90,000 images at 224 px would be 54 GB as float32).

    Attributes:
        classes (list or None): class names ``"0" .. "K-1"`` for single-label files, None for multi-label ones.
        labels_per_image (int): 1 for single-label files, L for multi-label ones.
    """

    def __init__(self, images, labels, channels=None, image_size=None):
        self.images = images  # (N, C, H, W) uint8
        self.labels = labels[:, 0] if labels.shape[1] == 1 else labels
        self.labels_per_image = labels.shape[1]
        self.channels = channels or images.shape[1]
        self.image_size = image_size
        self.classes = [str(c) for c in range(int(labels.max()) + 1)] if labels.shape[1] == 1 else None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index].float().unsqueeze(0) / 127.5 - 1.0
        if self.channels != image.shape[1]:
            image = image.expand(-1, 3, -1, -1) if self.channels == 3 else (image * LUMA).sum(1, keepdim=True)
        if self.image_size is not None and image.shape[-2:] != (self.image_size, self.image_size):
            # antialiased bilinear, as PIL's BILINEAR resize of the image folders
            image = F.interpolate(image, size=(self.image_size, self.image_size), mode="bilinear",
                                  align_corners=False, antialias=True)
        return image[0].contiguous(), self.labels[index]


def medmnist_npz(path, split="train", channels=None, image_size=None):
    """One split of a MedMNIST npz file as a dataset of ``(image, label)``.

    Args:
        path (str): the ``.npz`` file (e.g. ``pathmnist_64.npz``); nothing is downloaded.
        split (str): ``"train"``, ``"val"`` or ``"test"``.
        channels (int or None): 1 or 3 to convert to; None keeps the file's (1 for (N,H,W), 3 for (N,H,W,3)).
        image_size (int or None): height and width to resize to (bilinear, antialiased); None keeps the file's.

    Shape:
        images ``(channels, H, W)`` float32 in [-1, 1]; labels int64: the class for single-label files ((N,1)),
        the 0/1 vector for multi-label files ((N,L), L > 1).

    Example:
        >>> train = medmnist_npz("pathmnist_28.npz", "train", image_size=32)
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}")
    if image_size is not None and not (isinstance(image_size, int) and image_size >= 1):
        raise ValueError(f"image_size must be None or an int >= 1, got {image_size!r}")
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
    if images.dtype != np.uint8:
        raise ValueError(f"{path!r}: {split}_images must be uint8 (MedMNIST's format), got {images.dtype}")
    if len(labels) != len(images):
        raise ValueError(f"{path!r}: {len(images)} {split}_images but {len(labels)} {split}_labels")
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
    tensor = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2)
    labels = torch.from_numpy(labels.astype(np.int64)).reshape(len(labels), -1)
    return MedMNISTSplit(tensor, labels, channels, image_size)
