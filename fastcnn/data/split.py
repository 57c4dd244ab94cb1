"""Reproducible train/validation splits and the DataLoaders built on them."""
import torch
from torch.utils.data import DataLoader, Subset

# The lecture's Medical-MNIST split: 42,000 of 58,954 images train, the other 16,954 validate.
LECTURE_TRAIN_FRACTION = 42_000 / 58_954


def train_size(n, train_fraction=LECTURE_TRAIN_FRACTION):
    """round(n · train_fraction): 42,000 of 58,954 with the default fraction (1,280 of the 1,797 digits)."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    return round(n * train_fraction)


def split_train_val(dataset, train_fraction=LECTURE_TRAIN_FRACTION, seed=0):
    """Split ``dataset`` into (train, validation) Subsets by a permutation drawn from ``seed`` alone.

    The same dataset, fraction and seed always give the same split (the global RNG is not touched), so a resumed or
    distributed run sees the same validation images.

    Args:
        dataset: any map-style dataset.
        train_fraction (float): share of the training subset (default: the lecture's 42,000 / 58,954).
        seed (int): seed of the permutation.

    Example:
        >>> train, val = split_train_val(medical_mnist_folder, seed=0)   # 42,000 / 16,954 of 58,954
    """
    n = len(dataset)
    n_train = train_size(n, train_fraction)
    if n_train == 0 or n_train == n:
        raise ValueError(f"a dataset of {n} items cannot be split {train_fraction:.3f} / {1 - train_fraction:.3f}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, order[:n_train]), Subset(dataset, order[n_train:])


def make_loader(dataset, batch_size=16, *, shuffle=False, drop_last=False, num_workers=0, device="cpu",
                sampler=None):
    """A DataLoader with the choices spelled out: shuffling, ``drop_last``, workers and (on a GPU) pinned memory.

    With ``shuffle=True`` and no sampler the order is drawn from the global torch RNG at the start of each epoch, so
    seeding (and a checkpoint's saved RNG state) fixes it. A ``sampler`` (e.g. a DistributedSampler) is used as given,
    never replaced.

    Args:
        dataset: map-style dataset.
        batch_size (int): items per batch (the lecture's 16 gives 2,625 batches over 42,000 and 1,060 over 16,954).
        shuffle (bool): reshuffle each epoch (ignored when a sampler is given: the sampler decides the order).
        drop_last (bool): drop the last, smaller batch.
        num_workers (int): loader worker processes (0: load in the main process).
        device: where the batches go; memory is pinned when it is a CUDA device.
        sampler: an explicit sampler.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not (isinstance(num_workers, int) and num_workers >= 0):
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      drop_last=drop_last, num_workers=num_workers, pin_memory=torch.device(device).type == "cuda",
                      persistent_workers=num_workers > 0)
