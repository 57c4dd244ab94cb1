"""The VGG configurations of Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition" (arXiv 1409.1556), Table 1, as layer lists.

Entries, in order:
    ``int v``      a 3×3 convolution to ``v`` channels (padding 1), then ReLU ("conv3-v");
    ``(v, 1)``     a 1×1 convolution to ``v`` channels (no padding), then ReLU ("conv1-v", configuration C only);
    ``"M"``        a 2×2 max-pool with stride 2;
    ``"LRN"``      local response normalisation (configuration A-LRN only, after the first conv's ReLU).

A, B, D and E are torchvision's ``vgg11``, ``vgg13``, ``vgg16`` and ``vgg19``; their layer lists (and hence the
``features.{i}`` indices of the state_dict) are the same. C has D's indices with 1×1 kernels at 14, 21 and 28; A-LRN
has A's layers with the LRN at index 2, which shifts every later index by one.
"""
import torch.nn as nn

_BLOCKS_A = [[64], [128], [256, 256], [512, 512], [512, 512]]
_BLOCKS_B = [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]]
_BLOCKS_C = [[64, 64], [128, 128], [256, 256, (256, 1)], [512, 512, (512, 1)], [512, 512, (512, 1)]]
_BLOCKS_D = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
_BLOCKS_E = [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4]


def _with_pools(blocks):
    """The five conv blocks, each followed by a 2×2 max-pool."""
    return [layer for block in blocks for layer in (*block, "M")]


CONFIGS = {
    "A": _with_pools(_BLOCKS_A),
    "A-LRN": [64, "LRN", *_with_pools(_BLOCKS_A)[1:]],
    "B": _with_pools(_BLOCKS_B),
    "C": _with_pools(_BLOCKS_C),
    "D": _with_pools(_BLOCKS_D),
    "E": _with_pools(_BLOCKS_E),
}

# The paper's LRN is AlexNet's (Krizhevsky et al. 2012, §3.3): b = a / (k + α Σ a²)^β over n = 5 adjacent channels,
# with k = 2, α = 1e-4, β = 0.75. nn.LocalResponseNorm divides α by n, (k + α/n Σ a²)^-β, so the same formula is
# LocalResponseNorm(size=5, alpha=5 * 1e-4, beta=0.75, k=2.0). (Caffe's convention, alpha=1e-4 here, is 5× weaker.)
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


def alexnet_lrn():
    """The LRN layer of configuration A-LRN, with AlexNet's constants in the paper's convention (see above)."""
    return nn.LocalResponseNorm(size=LRN_SIZE, alpha=LRN_SIZE * LRN_ALPHA, beta=LRN_BETA, k=LRN_K)


def conv_spec(entry):
    """(out_channels, kernel_size, padding) of a conv entry: 3×3 with padding 1, or 1×1 without."""
    if isinstance(entry, tuple):
        channels, kernel = entry
        return channels, kernel, kernel // 2
    return entry, 3, 1
