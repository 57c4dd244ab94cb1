"""scikit-learn's handwritten digits (1,797 real 8×8 images that ship inside the package): the built-in dataset."""
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .split import LECTURE_TRAIN_FRACTION, split_train_val


def digits(image_size=32, channels=3, train_fraction=LECTURE_TRAIN_FRACTION, seed=0):
    """The digits as (train, validation) datasets of ``(image, label)``, resized to ``image_size``.

    Pixel values 0..16 are scaled to [-1, 1], then bilinearly resized (VGG/ResNet want ≥ 32 px) and repeated to
    ``channels``. Nothing is downloaded.

    Args:
        image_size (int): output height and width (default 32).
        channels (int): 1 (grayscale) or 3 (the torchvision models' input).
        train_fraction (float): training share (default the lecture's; 1,280 train / 517 validation).
        seed (int): seed of the split.

    Shape:
        images ``(channels, image_size, image_size)`` float32, labels int64 in 0..9.

    Example:
        >>> train, val = fastcnn.data.digits(image_size=32)
        >>> len(train), len(val), train[0][0].shape
        (1280, 517, torch.Size([3, 32, 32]))
    """
    from sklearn.datasets import load_digits

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if not (isinstance(image_size, int) and image_size >= 1):
        raise ValueError(f"image_size must be an int >= 1, got {image_size!r}")
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.expand(-1, channels, -1, -1).contiguous()
    dataset = TensorDataset(images, torch.as_tensor(bunch.target, dtype=torch.int64))
    dataset.classes = [str(d) for d in range(10)]
    return split_train_val(dataset, train_fraction, seed)
