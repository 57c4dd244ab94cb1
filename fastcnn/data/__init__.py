"""Datasets and loaders: scikit-learn's digits (built in, the default), Medical-MNIST style class folders, MedMNIST
``.npz`` files and the synthetic segmentation data. Nothing downloads."""
import os

from .digits import digits
from .folders import IMAGE_EXTENSIONS, BadImagesError, ImageFolderDataset, medical_mnist
from .npz import MedMNISTSplit, medmnist_npz
from .split import LECTURE_TRAIN_FRACTION, make_loader, split_train_val, train_size

__all__ = ["IMAGE_EXTENSIONS", "LECTURE_TRAIN_FRACTION", "BadImagesError", "ImageFolderDataset", "MedMNISTSplit",
           "digits", "load_dataset", "make_loader", "medical_mnist", "medmnist_npz", "split_train_val", "train_size"]


def load_dataset(source=None, image_size=32, channels=3, seed=0, *, skip_bad_images=False, progress=False):
    """(train, validation) datasets from a name or a path, the way the ``fastcnn`` command picks its data.

    Args:
        source: None or ``"digits"`` (scikit-learn's digits, the default); a ``.npz`` path (MedMNIST: its train and
            val splits); a directory (class folders, split the lecture's way).
        image_size (int or None): height and width the images are resized to (None: an npz file's own size).
        channels (int): 1 or 3.
        seed (int): seed of the train/validation split.
        skip_bad_images (bool): folders: leave files that do not decode out (else they raise, all listed at once).
        progress (bool): folders: a progress bar over the scan for bad files.
    """
    if source is None or source == "digits":
        return digits(image_size, channels, seed=seed)
    if str(source).endswith(".npz"):
        return (medmnist_npz(source, "train", channels, image_size),
                medmnist_npz(source, "val", channels, image_size))
    if os.path.isdir(source):
        return medical_mnist(source, image_size, channels, seed=seed, skip_bad_images=skip_bad_images,
                             progress=progress)
    raise ValueError(f"data source must be 'digits', a MedMNIST .npz file or a folder of class folders; got {source!r}")
