"""Drop-in fused modules."""
from .conv import ConvReLU2d, ConvReLUPool2d
from .conv_bn import ConvBNReLU2d, ConvBNReLUPool2d, FusedBatchNorm2d
from .conv_transpose import ConvTranspose2d
from .inception import BasicConv2d, InceptionBlock
from .residual import BasicBlock, Bottleneck
from .sequential_fusion import FusedAway, FusedSequential
from ..ops import skip_stock_routes
from .unfused import unfused

__all__ = ["BasicBlock", "Bottleneck", "ConvBNReLU2d", "ConvBNReLUPool2d", "ConvReLU2d", "ConvReLUPool2d",
           "ConvTranspose2d", "FusedAway", "FusedBatchNorm2d", "FusedSequential",
           "BasicConv2d", "InceptionBlock", "skip_stock_routes", "unfused"]
