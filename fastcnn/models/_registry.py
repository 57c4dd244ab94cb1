"""The model registry (``get_model`` / ``list_models``) and the arguments every model factory shares."""
_MODELS = {}


def register_model(factory):
    """Decorator: makes ``factory`` available as ``get_model(factory.__name__, ...)``."""
    if factory.__name__ in _MODELS:
        raise ValueError(f"fastcnn: a model named {factory.__name__!r} is already registered")
    _MODELS[factory.__name__] = factory
    return factory


def list_models():
    """The names ``get_model`` accepts, sorted.

    Example:
        >>> "resnet50" in fastcnn.models.list_models()
        True
    """
    return sorted(_MODELS)


def get_model(name, **kwargs):
    """Builds the model registered as ``name`` with ``kwargs`` (as torchvision's ``get_model``).

    Args:
        name: one of ``list_models()``, e.g. ``"vgg16_bn"`` or ``"resnet18"``.
        **kwargs: the factory's arguments, e.g. ``num_classes=10, fused=False``.

    Example:
        >>> model = fastcnn.models.get_model("vgg11", num_classes=10, width=0.25)
    """
    if not isinstance(name, str) or name.lower() not in _MODELS:
        raise ValueError(f"fastcnn: unknown model {name!r}; available models: {', '.join(list_models())}")
    return _MODELS[name.lower()](**kwargs)


def check_no_weights(weights):
    """fastcnn downloads nothing: pretrained weights come from torchvision's state_dict, which loads unchanged."""
    if weights is not None:
        raise ValueError("fastcnn: weights must be None (fastcnn downloads no weights); build the model with "
                         "weights=None and load a torchvision state_dict: model.load_state_dict(sd, strict=True)")
