"""Medical-MNIST style image folders: one sub-folder per class, JPEG/PNG, grayscale or RGB, any size; corrupt files
found by one scan before training, not hours into it."""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import Dataset

from .split import LECTURE_TRAIN_FRACTION, split_train_val

# torchvision's ImageFolder extensions.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolderDataset(Dataset):
    """Images in ``root/<class>/<file>``, decoded to a fixed size and channel count.

    Classes are the sub-folder names in sorted order (as torchvision's ImageFolder: Medical-MNIST gives AbdomenCT=0,
    BreastMRI=1, CXR=2, ChestCT=3, Hand=4, HeadCT=5); ``class_to_idx`` records the mapping. An empty class folder is
    an error at construction; an unreadable or corrupt image is an error naming the file when it is loaded, and
    :meth:`find_bad_images` lists every such file in one pass (:func:`medical_mnist` does, before any training).

    Args:
        root (str): the folder holding one sub-folder per class.
        image_size (int): output height and width (images of any size are resized, bilinear).
        channels (int): 1 (grayscale, Medical-MNIST's format) or 3 (RGB); images are converted to it.

    Shape:
        item ``(image, label)``: image ``(channels, image_size, image_size)`` float32 in [-1, 1], label int.

    Example:
        >>> ds = ImageFolderDataset("mmnist/", image_size=64, channels=1)
        >>> ds.class_to_idx["Hand"], len(ds)
        (4, 58954)
    """

    def __init__(self, root, image_size=64, channels=1):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder root {root!r} is not a directory")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        if not (isinstance(image_size, int) and image_size >= 1):
            raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
        self.root, self.image_size, self.channels = root, image_size, channels
        self.classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        if not self.classes:
            raise ValueError(f"image folder root {root!r} has no class sub-folders")
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.samples = []
        for name in self.classes:
            folder = os.path.join(root, name)
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                raise ValueError(f"class folder {folder!r} holds no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
            self.samples += [(os.path.join(folder, f), self.class_to_idx[name]) for f in files]
        self.targets = [label for _, label in self.samples]
        self.skipped = []  # (path, reason) of the files remove_bad_images() took out

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        return self.load_image(path), label

    def load_image(self, path):
        """Decode, convert and resize one file; a file PIL cannot read raises an error naming it."""
        from PIL import Image

        try:
            with Image.open(path) as image:
                image = image.convert("L" if self.channels == 1 else "RGB")
                if image.size != (self.image_size, self.image_size):
                    image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32)
        except (OSError, ValueError, SyntaxError) as error:  # PIL raises these for truncated/corrupt/unknown files
            raise ValueError(f"cannot read image {path!r}: {error}") from error
        tensor = torch.from_numpy(pixels.copy()).reshape(self.image_size, self.image_size, self.channels)
        return tensor.permute(2, 0, 1).contiguous() / 127.5 - 1.0

    def find_bad_images(self, progress=False):
        """``(path, reason)`` of every file that does not decode, in sample order: one pass, the same decoding as
        training (threads: PIL's decoders release the GIL). ``progress`` shows a tqdm bar on a terminal."""
        paths = [path for path, _ in self.samples]
        pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
        try:
            problems = pool.map(self._problem, paths)
            if progress:
                from tqdm import tqdm

                problems = tqdm(problems, total=len(paths), desc="checking images", disable=None, leave=False)
            return [(path, problem) for path, problem in zip(paths, problems) if problem is not None]
        finally:  # on Ctrl-C, drop the files not yet checked rather than wait for them
            pool.shutdown(cancel_futures=True)

    def _problem(self, path):
        try:
            self.load_image(path)
        except ValueError as error:
            reason = str(error.__cause__ or error)  # PIL's reason; the path is named once, by the caller
            return reason.replace(repr(path), "").replace(path, "").strip(" :") or "unreadable"
        return None

    def remove_bad_images(self, bad):
        """Take the files of ``bad`` (as :meth:`find_bad_images` returns) out of the samples; kept in ``skipped``."""
        paths = {path for path, _ in bad}
        self.samples = [sample for sample in self.samples if sample[0] not in paths]
        self.targets = [label for _, label in self.samples]
        self.skipped += list(bad)
        if not self.samples:
            raise ValueError(f"no readable images left in {self.root!r}")


_LISTED = 10  # bad files named in the error; the count says how many in all


class BadImagesError(ValueError):
    """Files of an image folder that do not decode; ``.bad`` holds their ``(path, reason)``."""

    def __init__(self, root, bad, total):
        self.bad = bad
        shown = ", ".join(f"{os.path.relpath(path, root)} ({reason})" for path, reason in bad[:_LISTED])
        more = f", and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
        super().__init__(f"{len(bad)} of {total} images in {root!r} cannot be read: {shown}{more}; fix or delete "
                         "them, or skip them (--skip-bad-images, skip_bad_images=True)")


def medical_mnist(root, image_size=64, channels=1, train_fraction=LECTURE_TRAIN_FRACTION, seed=0, *,
                  skip_bad_images=False, progress=False):
    """Medical-MNIST (or any class-folder tree) split the lecture's way into (train, validation).

    Of the 58,954 Medical-MNIST images, 42,000 train and 16,954 validate; other trees keep the same fraction. The
    class mapping is ``train.dataset.class_to_idx``. Every file is decoded once first: a corrupt one raises
    :class:`BadImagesError` listing them, or with ``skip_bad_images`` is left out (``train.dataset.skipped``).

    Args:
        root (str): the folder of class sub-folders.
        image_size (int): output size (Medical-MNIST is 64×64).
        channels (int): 1 or 3.
        train_fraction (float): training share.
        seed (int): seed of the split.
        skip_bad_images (bool): leave unreadable files out instead of raising.
        progress (bool): a progress bar over the scan (on a terminal).
    """
    dataset = ImageFolderDataset(root, image_size, channels)
    bad = dataset.find_bad_images(progress)
    if bad and not skip_bad_images:
        raise BadImagesError(root, bad, len(dataset))
    if bad:
        dataset.remove_bad_images(bad)
    return split_train_val(dataset, train_fraction, seed)
