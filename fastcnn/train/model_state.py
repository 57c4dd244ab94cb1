"""Loading a model's weights from a checkpoint with an error that says what went wrong in one line: which model the
checkpoint seems to hold, which keys are missing or unexpected, which tensors differ in shape.

torch's own ``load_state_dict`` error lists every key (hundreds of lines for a ResNet); a user who passed the wrong
``--model`` or ``--width`` needs to hear "this is a resnet18 checkpoint, not a vgg11" instead.
"""
import re

import torch

# Conv layers in ``features`` of each VGG configuration (the 3x3 ones; cfg C's 1x1 convs count too).
_VGG_DEPTHS = {8: "vgg11", 10: "vgg13", 13: "vgg16", 16: "vgg19"}
# Blocks per stage (and whether they are Bottlenecks) of each ResNet.
_RESNET_LAYERS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
                  ((3, 4, 6, 3), True): "resnet50", ((3, 4, 23, 3), True): "resnet101",
                  ((3, 8, 36, 3), True): "resnet152"}
_SHOWN = 3  # keys named per category in a message; the count says how many more


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, not fastcnn's, or of another model or optimizer."""


def describe_state_dict(state):
    """A short guess at the zoo model a state_dict belongs to, e.g. ``"resnet18 (width 0.25, 1-channel input,
    10 classes)"``, from its keys and shapes alone; None when it matches no zoo family."""
    keys = [key for key, value in state.items() if isinstance(value, torch.Tensor)]
    if any(key.startswith("encoder.") for key in keys) and any(key.startswith("decoder.") for key in keys):
        return "an encoder_decoder"
    if "conv1.weight" in state and "fc.weight" in state and any(key.startswith("layer1.") for key in keys):
        blocks = tuple(len({key.split(".")[1] for key in keys if key.startswith(f"layer{stage}.")})
                       for stage in range(1, 5))
        bottleneck = "layer1.0.conv3.weight" in state
        name = _RESNET_LAYERS.get((blocks, bottleneck), f"a ResNet with {blocks} blocks")
        return _with_details(name, state["conv1.weight"], 64, state["fc.weight"])
    convs = sorted((int(match.group(1)), key) for key in keys
                   if (match := re.fullmatch(r"features\.(\d+)\.weight", key)) and state[key].dim() == 4)
    if convs:
        name = _VGG_DEPTHS.get(len(convs), f"a VGG with {len(convs)} conv layers")
        if any(key.startswith("features.") and key.endswith("running_mean") for key in keys):
            name += "_bn"
        heads = sorted((int(m.group(1)), key) for key in keys if (m := re.fullmatch(r"classifier\.(\d+)\.weight", key)))
        return _with_details(name, state[convs[0][1]], 64, state[heads[-1][1]] if heads else None)
    linears = [key for key in keys if re.fullmatch(r"\d+\.weight", key) and state[key].dim() == 2]
    if linears and len(linears) * 2 == len(keys):
        name = "mlp" if len(linears) > 1 else "logistic_regression"
        first, last = state[linears[0]], state[linears[-1]]
        return f"{name} ({first.shape[1]} input features, {last.shape[0]} classes)"
    return None


def _with_details(name, first_conv, base_channels, head):
    details = []
    width = first_conv.shape[0] / base_channels
    if width != 1:
        details.append(f"width {width:g}")
    details.append(f"{first_conv.shape[1]}-channel input")
    if head is not None:
        details.append(f"{head.shape[0]} classes")
    return f"{name} ({', '.join(details)})"


def _some(keys):
    return ", ".join(keys[:_SHOWN]) + (f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else "")


def state_dict_mismatch(model, state):
    """None when ``state`` loads into ``model`` exactly, else one line saying what differs."""
    own = model.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    shapes = [f"{key} {tuple(state[key].shape)} vs {tuple(own[key].shape)}" for key in own
              if key in state and isinstance(state[key], torch.Tensor) and state[key].shape != own[key].shape]
    if not (missing or unexpected or shapes):
        return None
    theirs, ours = describe_state_dict(state), describe_state_dict(own)
    parts = []
    if theirs and theirs != ours:
        parts.append(f"it seems to hold {theirs}, this model is {ours or type(model).__name__}")
    if unexpected and all(key.startswith("module.") for key in unexpected):
        parts.append("its keys carry DistributedDataParallel's 'module.' prefix")
    if theirs and ours and theirs.split()[0] != ours.split()[0]:  # another architecture: the key names add nothing
        parts.append(f"{len(missing)} keys missing, {len(unexpected)} unexpected")
        return "; ".join(parts)
    if missing:
        parts.append(f"missing keys: {_some(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_some(unexpected)}")
    if shapes:
        parts.append(f"shapes differ (checkpoint vs model): {_some(shapes)} - another width, number of input "
                     "channels or classes?")
    return "; ".join(parts)


def load_model_state(model, state, source="the checkpoint"):
    """``model.load_state_dict(state)`` (strict), raising :class:`CheckpointError` with a one-line summary of the
    mismatch (see :func:`state_dict_mismatch`) instead of torch's list of every key.

    Args:
        model (nn.Module): the model to fill (unwrapped, not a DistributedDataParallel).
        state (dict): a state_dict, e.g. ``load_checkpoint(path)["model"]``.
        source (str): how to name the checkpoint in the message, e.g. its path.

    Example:
        >>> load_model_state(model, load_checkpoint("run/last.pt", required=("model",))["model"], "run/last.pt")
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: its model entry is a {type(state).__name__}, not a state_dict")
    problem = state_dict_mismatch(model, state)
    if problem:
        raise CheckpointError(f"{source} does not fit this model: {problem}")
    model.load_state_dict(state)
