"""Class activation maps: CAM for global-average-pool + linear heads, Grad-CAM for any layer, and a PNG with the
image, the heatmap (with its colour bar) and the overlay side by side.

CAM (Zhou et al. 2016): M_c(x, y) = Σ_k w_k^c f_k(x, y), with f the features entering GAP and w the linear layer's
weight. Grad-CAM (Selvaraju et al. 2017): α_k = mean_{x,y} ∂y_c/∂A_k(x, y), M_c = ReLU(Σ_k α_k A_k). Both maps are
then min-max normalised to [0, 1] and bilinearly resized to the input. For a GAP + linear head, ∂y_c/∂A_k = w_k^c/HW
at the last feature map, so Grad-CAM there equals ReLU(CAM) after normalisation (tests/train/test_cam.py).

Fused models: Grad-CAM runs its forward inside ``fastcnn.nn.unfused()``, where every fused module (residual and
Inception blocks, the fused runs of a ``FusedSequential``) runs the stock module sequence it replaces. A layer inside
a fused block (``layer4.1.conv2``, ``features.5``) then produces the very tensor it produces in the stock model, and
its map is the stock model's.

Grad-CAM hooks the *tensor* a layer outputs (a forward hook registers a gradient hook on it), never a module
backward hook, so layers followed by in-place ReLUs (torchvision's and the zoo's) work: a tensor hook registered
before an in-place op receives the gradient of the value before it, and the activation is cloned before any later
in-place op changes it. ``with GradCAM(...) as cam:`` removes every hook on exit.
"""
import difflib
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import unfused


class DegenerateMapWarning(UserWarning):
    """A Grad-CAM map that cannot show where the evidence lies: the layer's output is 1×1, or the map is constant."""


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
    classes = torch.as_tensor(targets, device=logits.device).expand(logits.shape[0])
    if classes.numel() and not (0 <= int(classes.min()) and int(classes.max()) < logits.shape[1]):
        raise ValueError(f"target classes must be in [0, {logits.shape[1]}), got {classes.tolist()}")
    return classes


def last_conv_name(model):
    """The name of the last ``nn.Conv2d`` of ``model`` (fastcnn's fused convolutions are ``nn.Conv2d`` too)."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if not names:
        raise ValueError("the model has no Conv2d layer to explain; pass layer=")
    return names[-1]


def resolve_layer(model, layer):
    """``layer`` - a module of ``model`` or its name, e.g. ``"layer4.1.conv2"`` - as ``(name, module)``.

    A name that is no module of ``model`` raises a ValueError listing close names (or, failing those, the top-level
    modules and the last convolutions), so a typo is one look away from the right name.
    """
    modules = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        for name, module in modules.items():
            if module is layer:
                return name, module
        raise ValueError(f"target layer {type(layer).__name__} is not a module of the model")
    if layer in modules:
        return layer, modules[layer]
    names = [name for name in modules if name]
    close = difflib.get_close_matches(str(layer), names, n=6, cutoff=0.6)
    if close:
        hint = f"close names: {', '.join(close)}"
    else:
        convs = [name for name in names if isinstance(modules[name], nn.Conv2d)][-3:]
        typical = [name for name, _ in model.named_children()] + [name for name in convs if "." in name]
        hint = f"valid names include {', '.join(typical)} (any name of model.named_modules())"
    raise ValueError(f"layer {layer!r} is not a module of the model; {hint}")


class GradCAM:
    """Grad-CAM over one or more layers of ``model`` (their maps are averaged), fused or stock alike.

    The explained forward and backward run inside ``fastcnn.nn.unfused()`` (see the module docstring), so any layer
    of a fused model - also one inside a fused residual or Inception block - has the stock model's map. They leave
    no gradient in the model's parameters. A layer that runs more than once in a forward is explained at its last
    call. A layer whose map is 1×1 or constant gets a ``DegenerateMapWarning`` naming the last layer whose output
    was larger than 1×1 in the same forward.

    Args:
        model (nn.Module): the network, in eval mode as a rule (in training mode BatchNorm layers use, and update,
            batch statistics).
        target_layers (list of nn.Module or str): the layers to explain, as modules or names, e.g.
            ``["layer4.1.conv2"]`` or ``[model.layer4[-1]]`` (ResNet), ``[model.features[-1]]`` (VGG).

    Shape:
        call with input ``(N, C, H, W)``; returns ``(N, H, W)`` maps in [0, 1]. After a call, ``classes`` ``(N,)``
        holds the explained classes, ``layer_maps`` each layer's ``(N, H, W)`` map by name and ``shapes`` every
        module's output shape by name, in the order the modules finished.

    Example:
        >>> with GradCAM(model, ["layer4.1.conv2"]) as cam:
        ...     maps = cam(images)                 # targets=None: each image's predicted class
    """

    def __init__(self, model, target_layers):
        if isinstance(target_layers, (nn.Module, str)):
            target_layers = [target_layers]
        if not target_layers or not all(isinstance(layer, (nn.Module, str)) for layer in target_layers):
            raise TypeError("target_layers must be a non-empty list of nn.Modules or module names")
        self.model, self.activations, self.gradients, self.shapes, self.layer_maps = model, {}, {}, {}, {}
        self._recording = False
        resolved = [resolve_layer(model, layer) for layer in target_layers]
        self.names = [name for name, _ in resolved]
        self.handles = [module.register_forward_hook(self._capture(index))
                        for index, (_, module) in enumerate(resolved)]

    def _capture(self, index):
        def hook(module, inputs, output):
            if not self._recording:  # the model's own forwards between calls are none of Grad-CAM's business
                return
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ValueError(f"Grad-CAM needs a layer with an (N, C, H, W) output; {self.names[index]!r} "
                                 f"outputs {shape}")
            activation = output.detach().clone()  # before a later in-place op (ReLU) overwrites the output
            self.activations[index] = activation
            self.gradients.pop(index, None)
            if output.requires_grad:
                output.register_hook(self._keep_gradient(index, activation))
        return hook

    def _keep_gradient(self, index, activation):
        def hook(grad):
            # A layer called twice registers two hooks; only the gradient of the call whose output is kept counts.
            if self.activations.get(index) is activation:
                self.gradients[index] = grad.detach()
        return hook

    def _record_shape(self, name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                self.shapes.pop(name, None)  # re-inserted: the dict keeps the order in which modules last finished
                self.shapes[name] = tuple(output.shape)
        return hook

    def __call__(self, input, targets=None):
        self.activations.clear()
        self.gradients.clear()
        self.shapes, self.layer_maps = {}, {}
        input = input.detach().requires_grad_(True)  # so the graph reaches the layers even when weights are frozen
        recorders = [module.register_forward_hook(self._record_shape(name))
                     for name, module in self.model.named_modules() if name]
        self._recording = True
        try:
            with torch.enable_grad(), unfused():
                logits = self.model(input)
                classes = _targets(logits, targets)
                # Differentiating to the input only: the layer gradients come from the tensor hooks, and the
                # parameters' .grad (a training loop's) stay untouched.
                torch.autograd.grad(logits.gather(1, classes.view(-1, 1)).sum(), input)
        finally:
            self._recording = False
            for handle in recorders:
                handle.remove()
        for index, name in enumerate(self.names):
            activation, gradient = self._captured(index, name)
            weights = _at_least_float32(gradient).mean(dim=(2, 3), keepdim=True)
            raw = F.relu((weights * _at_least_float32(activation)).sum(1))
            self._warn_if_degenerate(name, raw)
            self.layer_maps[name] = normalize_maps(raw, input.shape[-2:])
        self.classes = classes
        return torch.stack(list(self.layer_maps.values())).mean(0)

    def _captured(self, index, name):
        if index not in self.activations:
            raise ValueError(f"Grad-CAM: layer {name!r} produced no output during the forward (the model never "
                             "called it), so there is nothing to explain; name a layer the forward runs"
                             + self._suggestion(name, ", e.g. {}"))
        if index not in self.gradients:
            raise ValueError(f"Grad-CAM: layer {name!r} received no gradient from the class score (its output does "
                             "not reach the logits)" + self._suggestion(name, "; name a layer that does, e.g. {}"))
        return self.activations[index], self.gradients[index]

    def larger_layer(self, exclude=None):
        """The last module of the last call (other than ``exclude``) whose output is ``(N, C, H, W)`` with more than
        one position, as ``(name, (H, W))``; None when there is none."""
        for name, shape in reversed(self.shapes.items()):
            if len(shape) == 4 and shape[2] * shape[3] > 1 and name != exclude:
                return name, shape[2:]
        return None

    def _suggestion(self, name, template):
        larger = self.larger_layer(exclude=name)
        return template.format(f"{larger[0]!r} ({larger[1][0]}×{larger[1][1]})") if larger else ""

    def _warn_if_degenerate(self, name, raw):
        flat = raw.flatten(1)
        constant = flat.amax(1) == flat.amin(1)
        if flat.shape[1] > 1 and not constant.any():
            return
        if flat.shape[1] == 1:
            why = "its output is 1×1 at this input size, so the map is one value spread over the image"
        else:
            why = (f"the map is constant for image(s) {constant.nonzero().flatten().tolist()} (no position has a "
                   "positive gradient-weighted activation, or all have the same)")
        hint = self._suggestion(name, "; explain a layer with a larger output, e.g. {}")
        if not hint and flat.shape[1] == 1:
            hint = "; no layer has an output larger than 1×1 at this input size: use larger inputs"
        warnings.warn(f"Grad-CAM at {name!r}: {why}: it shows nothing of where the evidence lies{hint}",
                      DegenerateMapWarning, stacklevel=3)

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
        with unfused():  # the stock feature tensors, as Grad-CAM sees them
            logits = model(input)
    finally:
        handle.remove()
    if "features" not in captured:
        raise ValueError("CAM: feature_layer produced no output during the forward")
    classes = _targets(logits, targets)
    features = _at_least_float32(captured["features"])
    maps = torch.einsum("nk,nkhw->nhw", fc.weight.to(features.dtype)[classes], features)
    return normalize_maps(F.relu(maps), input.shape[-2:])


def _as_rgb(image):
    """``image`` (C, H, W), any range, min-max scaled to [0, 1] as an (H, W, 3) CPU tensor (1 channel: grey)."""
    picture = image.detach().float().cpu()
    picture = (picture - picture.min()) / (picture.max() - picture.min()).clamp_min(1e-12)
    picture = picture.expand(3, -1, -1) if picture.shape[0] == 1 else picture[:3]
    return picture.permute(1, 2, 0)


def overlay(image, heatmap, image_weight=0.5):
    """Blend a [0, 1] ``heatmap`` (H, W), coloured with the jet map, over ``image`` ((C, H, W), any range: it is
    min-max scaled to [0, 1]); returns an (H, W, 3) float array in [0, 1]."""
    from matplotlib import colormaps

    if not 0.0 <= image_weight <= 1.0:
        raise ValueError(f"image_weight must be in [0, 1], got {image_weight!r}")
    colored = torch.from_numpy(colormaps["jet"](heatmap.detach().float().cpu().numpy())[..., :3]).float()
    blended = (1 - image_weight) * colored + image_weight * _as_rgb(image)
    return (blended / blended.max()).numpy()


def cam_figure(image, heatmap, image_weight=0.5, title=None):
    """A matplotlib Figure of three panels side by side: ``image`` (C, H, W), the [0, 1] ``heatmap`` (H, W) with a
    colour bar, and the overlay (see ``overlay``). Drawn on the Agg canvas without pyplot, so it needs no display
    and leaves pyplot's global state alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    axes[0].imshow(_as_rgb(image).numpy())
    shown = axes[1].imshow(heatmap.detach().float().cpu().numpy(), cmap="jet", vmin=0, vmax=1)
    figure.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04, label="Grad-CAM (normalised)")
    axes[2].imshow(overlay(image, heatmap, image_weight))
    for ax, name in zip(axes, ("image", "heatmap", "overlay")):
        ax.set_title(name)
        ax.set_axis_off()
    if title:
        figure.suptitle(title)
    return figure


def explain_to_png(model, image, path, layer=None, target=None, image_weight=0.5):
    """Grad-CAM of one ``image`` at ``layer``, saved to ``path`` as image | heatmap with colour bar | overlay.

    Args:
        model (nn.Module): the network (fused or stock), in eval mode as a rule.
        image (Tensor): ``(C, H, W)``, on the model's device.
        path (str): the PNG to write.
        layer (str, optional): a module name (e.g. ``"layer3"``, ``"features.20"``); default the last Conv2d.
        target (int, optional): the class to explain; default the predicted one.
        image_weight (float): the image's share of the overlay, in [0, 1].

    Returns:
        int: the explained class.

    Example:
        >>> explain_to_png(model.eval(), image, "cam.png", layer="layer3")
    """
    layer = layer or last_conv_name(model)
    with GradCAM(model, [layer]) as grad_cam:
        heatmap = grad_cam(image.unsqueeze(0), target)[0]
        explained = int(grad_cam.classes[0])
    figure = cam_figure(image, heatmap, image_weight, title=f"Grad-CAM of class {explained} at {layer!r}")
    figure.savefig(path, dpi=100)
    return explained
