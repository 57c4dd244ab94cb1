"""Class activation maps: CAM for global-average-pool + linear heads, Grad-CAM for any layer, and heatmaps blended
over the input, saved as PNG.

CAM (Zhou et al. 2016): M_c(x, y) = Σ_k w_k^c f_k(x, y), with f the features entering GAP and w the linear layer's
weight. Grad-CAM (Selvaraju et al. 2017): α_k = mean_{x,y} ∂y_c/∂A_k(x, y), M_c = ReLU(Σ_k α_k A_k). Both maps are
then min-max normalised to [0, 1] and bilinearly resized to the input. For a GAP + linear head, ∂y_c/∂A_k = w_k^c/HW
at the last feature map, so Grad-CAM there equals ReLU(CAM) after normalisation (tests/train/test_cam.py).

Grad-CAM hooks the *tensor* a layer outputs (a forward hook registers a gradient hook on it), never a module
backward hook, so layers followed by in-place ReLUs (torchvision's and the zoo's) work; the activation is cloned
before any later in-place op changes it. ``with GradCAM(...) as cam:`` removes every hook on exit.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def normalize_maps(maps, size):
    """Min-max normalise each (H, W) map of ``maps`` (N, H, W) to [0, 1] and resize to ``size``."""
    flat = maps.flatten(1)
    low, high = flat.min(1).values.view(-1, 1, 1), flat.max(1).values.view(-1, 1, 1)
    maps = (maps - low) / (high - low).clamp_min(torch.finfo(maps.dtype).tiny)
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def _at_least_float32(tensor):
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _targets(logits, targets):
    if targets is None:
        return logits.argmax(1)
    return torch.as_tensor(targets, device=logits.device).expand(logits.shape[0])


class GradCAM:
    """Grad-CAM over one or more layers of ``model`` (their maps are averaged).

    Args:
        model (nn.Module): the network, in eval mode as a rule.
        target_layers (list of nn.Module): the layers to explain, e.g. ``[model.layer4[-1]]`` (ResNet) or
            ``[model.features[-1]]`` (VGG).

    Shape:
        call with input ``(N, C, H, W)``; returns ``(N, H, W)`` maps in [0, 1].

    Example:
        >>> with GradCAM(model, [model.layer4[-1]]) as cam:
        ...     maps = cam(images)                 # targets=None: each image's predicted class
    """

    def __init__(self, model, target_layers):
        if isinstance(target_layers, nn.Module):
            target_layers = [target_layers]
        if not target_layers or not all(isinstance(layer, nn.Module) for layer in target_layers):
            raise TypeError("target_layers must be a non-empty list of nn.Modules")
        self.model, self.activations, self.gradients = model, {}, {}
        self.handles = [layer.register_forward_hook(self._capture(index)) for index, layer in
                        enumerate(target_layers)]

    def _capture(self, index):
        def hook(module, inputs, output):
            self.activations[index] = output.detach().clone()
            if output.requires_grad:
                output.register_hook(lambda grad: self.gradients.__setitem__(index, grad.detach()))
        return hook

    def __call__(self, input, targets=None):
        self.activations.clear()
        self.gradients.clear()
        input = input.detach().requires_grad_(True)  # so the graph reaches the layers even when weights are frozen
        with torch.enable_grad():
            logits = self.model(input)
            classes = _targets(logits, targets)
            self.model.zero_grad(set_to_none=True)
            logits.gather(1, classes.view(-1, 1)).sum().backward()
        maps = []
        for index, activation in self.activations.items():
            weights = _at_least_float32(self.gradients[index]).mean(dim=(2, 3), keepdim=True)
            maps.append(normalize_maps(F.relu((weights * _at_least_float32(activation)).sum(1)), input.shape[-2:]))
        self.classes = classes
        return torch.stack(maps).mean(0)

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


@torch.no_grad()
def cam(model, input, feature_layer, fc, targets=None):
    """CAM for a model whose ``feature_layer`` output goes through global average pooling into the linear ``fc``.

    Args:
        model: the network; ``feature_layer`` one of its modules (e.g. ResNet's ``layer4``), ``fc`` its final
            ``nn.Linear`` (e.g. ``model.fc``).
        input: ``(N, C, H, W)``.
        targets: class per image (or one for all); None: the predicted class.

    Returns:
        ``(N, H, W)``: ReLU(Σ_k w_k^c f_k), min-max normalised and resized to the input.
    """
    captured = {}
    handle = feature_layer.register_forward_hook(lambda m, i, output: captured.setdefault("features", output))
    try:
        logits = model(input)
    finally:
        handle.remove()
    classes = _targets(logits, targets)
    features = _at_least_float32(captured["features"])
    maps = torch.einsum("nk,nkhw->nhw", fc.weight.to(features.dtype)[classes], features)
    return normalize_maps(F.relu(maps), input.shape[-2:])


def overlay(image, heatmap, image_weight=0.5):
    """Blend a [0, 1] ``heatmap`` (H, W), coloured with the jet map, over ``image`` ((C, H, W), any range: it is
    min-max scaled to [0, 1]); returns an (H, W, 3) float array in [0, 1]."""
    from matplotlib import colormaps

    if not 0.0 <= image_weight <= 1.0:
        raise ValueError(f"image_weight must be in [0, 1], got {image_weight!r}")
    picture = image.detach().float().cpu()
    picture = (picture - picture.min()) / (picture.max() - picture.min()).clamp_min(1e-12)
    picture = picture.expand(3, -1, -1) if picture.shape[0] == 1 else picture[:3]
    colored = torch.from_numpy(colormaps["jet"](heatmap.detach().float().cpu().numpy())[..., :3]).float()
    blended = (1 - image_weight) * colored + image_weight * picture.permute(1, 2, 0)
    return (blended / blended.max()).numpy()


def last_conv_name(model):
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not names:
        raise ValueError("the model has no Conv2d layer to explain; pass layer=")
    return names[-1]


def explain_to_png(model, image, path, layer=None, target=None, image_weight=0.5):
    """Grad-CAM of one ``image`` (C, H, W) at ``layer`` (a module name; default the last Conv2d), blended over the
    image and saved to ``path``; returns the explained class."""
    from matplotlib import pyplot

    modules = dict(model.named_modules())
    layer = layer or last_conv_name(model)
    if layer not in modules:
        raise ValueError(f"layer {layer!r} is not a module of the model (e.g. {last_conv_name(model)!r})")
    with GradCAM(model, [modules[layer]]) as grad_cam:
        heatmap = grad_cam(image.unsqueeze(0), target)[0]
        explained = int(grad_cam.classes[0])
    pyplot.imsave(path, overlay(image, heatmap, image_weight))
    return explained
