"""The model zoo: torchvision-compatible VGG and ResNet (fused or stock, same state_dict), the paper's extra VGG
configurations, flat baselines, and the registry (``get_model``, ``list_models``)."""
from ._registry import get_model, list_models
from .baselines import logistic_regression, mlp
from .resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from .vgg import VGG, vgg, vgg11, vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19, vgg19_bn

__all__ = [
    "ResNet", "VGG", "get_model", "list_models", "logistic_regression", "mlp",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "vgg", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
]
