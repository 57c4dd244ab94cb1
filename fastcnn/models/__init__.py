"""The model zoo: torchvision-compatible VGG and ResNet (fused or stock, same state_dict), the paper's extra VGG
configurations, flat baselines, the encoder-decoder multi-task model, and the registry (``get_model``,
``list_models``)."""
from ._registry import get_model, list_models
from .baselines import logistic_regression, mlp
from .encoder_decoder import EncoderDecoder, encoder_decoder
from .resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from .vgg import VGG, vgg, vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19, vgg19_bn

__all__ = [
    "EncoderDecoder", "ResNet", "VGG", "encoder_decoder", "get_model", "list_models", "logistic_regression", "mlp",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "vgg", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
]
