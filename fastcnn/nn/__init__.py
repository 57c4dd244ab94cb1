"""Drop-in fused modules."""
from .conv import ConvReLU2d, ConvReLUPool2d
from .conv_transpose import ConvTranspose2d
from .residual import BasicBlock, Bottleneck

__all__ = ["BasicBlock", "Bottleneck", "ConvReLU2d", "ConvReLUPool2d", "ConvTranspose2d"]
