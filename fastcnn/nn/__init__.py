"""Drop-in fused modules."""
from .conv import ConvReLU2d, ConvReLUPool2d

__all__ = ["ConvReLU2d", "ConvReLUPool2d"]
