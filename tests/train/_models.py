"""Small models for the trainer tests (the zoo's are too big for a 2-core test run)."""
import torch
import torch.nn as nn


def tiny_cnn(in_channels=1, num_classes=10, dropout=0.1, batch_norm=False):
    """Conv-ReLU-MaxPool, GAP, dropout, linear: enough to learn the digits in a second."""
    norm = [nn.BatchNorm2d(8)] if batch_norm else []
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), *norm, nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(8, num_classes))


def digit_batches(n=64, size=8, seed=0):
    """A deterministic TensorDataset of digits-shaped data (random images, labels 0..9)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, size, size, generator=generator)
    return torch.utils.data.TensorDataset(images, torch.randint(0, 10, (n,), generator=generator))
