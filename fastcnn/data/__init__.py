"""Datasets and loaders: scikit-learn's digits (built in, the default), Medical-MNIST style class folders, MedMNIST
``.npz`` files and the synthetic segmentation data. Nothing downloads."""
import os

from .digits import digits
from .folders import IMAGE_EXTENSIONS, ImageFolderDataset, medical_mnist
from .npz import medmnist_npz
from .split import LECTURE_TRAIN_FRACTION, make_loader, split_train_val, train_size

__all__ = ["IMAGE_EXTENSIONS", "LECTURE_TRAIN_FRACTION", "ImageFolderDataset", "digits", "load_dataset",
           "make_loader", "medical_mnist", "medmnist_npz", "split_train_val", "train_size"]


def load_dataset(source=None, image_size=32, channels=3, seed=0):
    """(train, validation) datasets from a name or a path, the way the ``fastcnn`` command picks its data.

    Args:
        source: None or ``"digits"`` (scikit-learn's digits, the default); a ``.npz`` path (MedMNIST: its train and
            val splits); a directory (class folders, split the lecture's way).
        image_size (int): height and width of the images (digits and folders are resized; npz keeps its own).
        channels (int): 1 or 3.
        seed (int): seed of the train/validation split.
    """
    if source is None or source == "digits":
        return digits(image_size, channels, seed=seed)
    if str(source).endswith(".npz"):
        return medmnist_npz(source, "train", channels), medmnist_npz(source, "val", channels)
    if os.path.isdir(source):
        return medical_mnist(source, image_size, channels, seed=seed)
    raise ValueError(f"data source must be 'digits', a MedMNIST .npz file or a folder of class folders; got {source!r}")
