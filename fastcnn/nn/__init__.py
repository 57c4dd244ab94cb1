"""Drop-in fused modules."""
from .conv import ConvReLU2d, ConvReLUPool2d
from .residual import BasicBlock, Bottleneck

__all__ = ["BasicBlock", "Bottleneck", "ConvReLU2d", "ConvReLUPool2d"]
