"""Segmentation data that needs no download: synthetic shapes with exact masks, and masks thresholded from the real
sample images shipped inside scikit-image. Every item is ``(image, mask, label)``: a float image ``[C, H, W]`` in
[0, 1], a long mask ``[H, W]`` of per-pixel classes (0 = background) and a long image-level label."""
import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("disc", "square", "triangle")


def _shape_mask(kind, size, cy, cx, r):
    yy, xx = np.mgrid[:size, :size]
    if kind == "disc":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if kind == "square":
        return (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    return (yy - cy <= r) & (yy - cy >= -r) & (abs(xx - cx) <= (yy - cy + r) / 2)  # apex up, base 2r wide


class SyntheticShapes(Dataset):
    """One shape per image (disc, square or triangle) on a noisy background; the label is the shape kind and the
    mask marks its pixels with ``1 + kind``. Deterministic per ``(seed, index)``.

    Args:
        length: number of items. size: image side (default 32). channels: 1 or 3. seed: base seed.

    Shape:
        image ``[channels, size, size]`` float32, mask ``[size, size]`` int64 in ``[0, 3]``, label int64 in ``[0, 2]``.

    Example:
        >>> image, mask, label = SyntheticShapes(8)[0]
        >>> image.shape, mask.shape
        (torch.Size([3, 32, 32]), torch.Size([32, 32]))
    """

    num_classes = len(SHAPES)
    num_seg_classes = len(SHAPES) + 1

    def __init__(self, length, size=32, channels=3, seed=0):
        if size < 12:
            raise ValueError(f"fastcnn: SyntheticShapes needs size >= 12, got {size}")
        self.length, self.size, self.channels, self.seed = length, size, channels, seed

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = np.random.default_rng([self.seed, index])
        kind = int(rng.integers(len(SHAPES)))
        r = int(rng.integers(self.size // 6, self.size // 3))
        cy, cx = (int(rng.integers(r, self.size - r)) for _ in range(2))
        inside = _shape_mask(SHAPES[kind], self.size, cy, cx, r)
        color = rng.uniform(0.5, 1.0, size=(self.channels, 1, 1))
        image = rng.uniform(0.0, 0.3, size=(self.channels, self.size, self.size)) + inside * color
        mask = np.where(inside, kind + 1, 0)
        return (torch.from_numpy(np.clip(image, 0, 1).astype(np.float32)), torch.from_numpy(mask).long(),
                torch.tensor(kind))


class SampleImageMasks(Dataset):
    """Random crops of scikit-image's bundled photos with Otsu-threshold masks (foreground = the minority side of
    the threshold: the coins of ``coins``, the horse of ``horse``). The label is the source image's index.

    Args:
        names: scikit-image sample names (default ``("coins", "horse")``). length: number of crops.
        size: crop side after a 2x downscale (default 64). seed: base seed.

    Shape:
        image ``[1, size, size]``, mask ``[size, size]`` in {0, 1}, label in ``[0, len(names))``.
    """

    num_seg_classes = 2

    def __init__(self, names=("coins", "horse"), length=32, size=64, seed=0):
        from skimage import data, filters

        self.images, self.masks = [], []
        for name in names:
            image = np.asarray(getattr(data, name)(), dtype=np.float32)
            if image.ndim == 3:
                image = image[..., :3].mean(-1)
            image = (image - image.min()) / max(float(np.ptp(image)), 1e-6)
            image = image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2]
            image = image.reshape(image.shape[0] // 2, 2, image.shape[1] // 2, 2).mean((1, 3))
            if min(image.shape) < size:
                raise ValueError(f"fastcnn: sample image {name!r} is smaller than size={size} after downscaling")
            above = image > filters.threshold_otsu(image)
            self.images.append(image)
            self.masks.append(above if above.mean() < 0.5 else ~above)
        self.num_classes = len(names)
        self.length, self.size, self.seed = length, size, seed

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        rng = np.random.default_rng([self.seed, index])
        label = index % len(self.images)
        image, mask = self.images[label], self.masks[label]
        y, x = (int(rng.integers(0, s - self.size + 1)) for s in image.shape)
        crop = (slice(y, y + self.size), slice(x, x + self.size))
        return (torch.from_numpy(np.ascontiguousarray(image[crop]))[None], torch.from_numpy(mask[crop]).long(),
                torch.tensor(label))
