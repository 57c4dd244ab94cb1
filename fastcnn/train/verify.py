"""Parity verification: a fused model and its stock twin, the same weights, the same batches, fastcnn's optimizer
and torch.optim's, stepped in lockstep; a report of how far apart they drift and how fast each runs.

Per step, both models run forward (under the same autocast), the loss, backward and their optimizer's step on the
same batch, each from the same RNG state (so dropout masks agree); so does a control (a copy of the stock model run in
the other memory format - the same math through other kernels, as the fused model is - whose weights are also
perturbed by one unit roundoff after every step) that measures how far rounding alone carries the run. The
per-step loss difference, the final parameter difference and each side's throughput are reported, with pass/fail by
the rule and per-dtype floors of :mod:`fastcnn.train.tolerances`.
"""
import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .log import ProgressBar
from .metrics import EpochMetrics
from .schedules import build_scheduler
from .tolerances import PARITY_FACTOR, PARITY_FLOOR, PARITY_WINDOW, PRECISION_DTYPES, parity_bound

OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad")


def optimizer_pair(name, fused_params, stock_params, **hyper):
    """(fastcnn.optim.X(fused_params), torch.optim.X(stock_params)) with the same hyperparameters."""
    import fastcnn.optim

    classes = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "adagrad": "Adagrad"}
    if name not in classes:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    fused_class, stock_class = getattr(fastcnn.optim, classes[name]), getattr(torch.optim, classes[name])
    return fused_class(fused_params, **hyper), stock_class(stock_params, **hyper)


def model_pair(model, **model_kwargs):
    """(fused, stock) with identical weights from a zoo name, a stock nn.Module, or a ready (fused, stock) pair."""
    if isinstance(model, str):
        from fastcnn.models import get_model

        stock = get_model(model, fused=False, **model_kwargs)
        fused = get_model(model, fused=True, **model_kwargs)
        fused.load_state_dict(stock.state_dict())
        return fused, stock
    if isinstance(model, nn.Module):
        from fastcnn import convert

        return convert(model), model
    if isinstance(model, (tuple, list)) and len(model) == 2 and all(isinstance(m, nn.Module) for m in model):
        return model[0], model[1]
    raise TypeError(f"model must be a model name, an nn.Module or a (fused, stock) pair, got {type(model).__name__}")


@dataclass
class ParityReport:
    """What :func:`verify` measured; ``passed`` applies the rule of :mod:`fastcnn.train.tolerances` over the
    lockstep window (the first ``window`` steps).

    ``loss_differences[t]`` / ``control_differences[t]``: relative loss difference of the fused model / the control
    from the stock model at step t (every step of the run); ``window_parameter_differences``: (fused, control)
    parameter differences after the window's last step; ``final_parameter_difference``: the fused model's after the
    run (reported; beyond the window training chaos, not the kernels, decides its size).
    """

    dtype: torch.dtype
    window: int
    loss_differences: list
    control_differences: list
    window_parameter_differences: tuple
    final_parameter_difference: float
    worst_parameter: str
    seconds: dict
    images: int
    val_accuracy: dict = field(default_factory=dict)
    train_loss: dict = field(default_factory=dict)

    def bounds(self):
        """The allowed loss difference at each step of the window (from the control's largest drift so far)."""
        envelope, bounds = 0.0, []
        for drift in self.control_differences[:self.window]:
            envelope = max(envelope, drift)
            bounds.append(parity_bound(envelope, self.dtype))
        return bounds

    @property
    def first_failing_step(self):
        """1-based step of the window where the fused loss left its bound, or None."""
        return next((t + 1 for t, (d, b) in enumerate(zip(self.loss_differences, self.bounds())) if d > b), None)

    @property
    def parameter_bound(self):
        return parity_bound(self.window_parameter_differences[1], self.dtype)

    @property
    def passed(self):
        return self.first_failing_step is None and self.window_parameter_differences[0] <= self.parameter_bound

    def throughput(self, side):
        return self.images / self.seconds[side]

    def format(self):
        """The report as text: parity verdict, drift against its bound, accuracy and speed of each side."""
        window = min(self.window, len(self.loss_differences))
        failing = self.first_failing_step
        lines = [
            f"parity ({self.dtype}; over the first {window} steps: drift <= {PARITY_FACTOR:g} x control drift + "
            f"{PARITY_FLOOR[self.dtype]:g}): {'PASS' if self.passed else 'FAIL'}",
            f"  loss difference, steps 1-{window}: {max(self.loss_differences[:window], default=0.0):.3g} at most "
            f"(control {max(self.control_differences[:window], default=0.0):.3g})"
            + (f"; out of bounds from step {failing}" if failing else ""),
            f"  parameter difference after step {window}: {self.window_parameter_differences[0]:.3g} "
            f"(bound {self.parameter_bound:.3g}; control {self.window_parameter_differences[1]:.3g})",
            f"  whole run, {len(self.loss_differences)} steps: largest loss difference "
            f"{max(self.loss_differences, default=0.0):.3g} (control {max(self.control_differences, default=0.0):.3g})"
            f", final parameter difference {self.final_parameter_difference:.3g} (in {self.worst_parameter})",
        ]
        for side in ("fused", "stock"):
            accuracy = self.val_accuracy.get(side)
            shown = f", validation accuracy {accuracy:.4f}" if accuracy is not None else ""
            lines.append(f"  {side}: {self.throughput(side):.1f} images/s training, "
                         f"final train loss {self.train_loss.get(side, float('nan')):.4f}{shown}")
        lines.append(f"  speed: fused is {self.seconds['stock'] / self.seconds['fused']:.2f}x stock "
                     "(training steps: forward, backward, optimizer)")
        return "\n".join(lines)


def parameter_difference(fused, stock):
    """max over parameters of max|a − b| / max(1, max|b|), and the name of the worst parameter."""
    worst, name = 0.0, ""
    stock_params = dict(stock.named_parameters())
    for key, value in fused.named_parameters():
        reference = stock_params[key].detach().double()
        difference = (value.detach().double() - reference).abs().max().item() / max(1.0, reference.abs().max().item())
        if difference > worst or not name:
            worst, name = difference, key
    return worst, name


class RoundingNoise:
    """Scales floating-point parameters by (1 ± u), u the unit roundoff of ``dtype``, signs drawn from a private
    generator (the global RNG is not touched): the size of difference one correctly rounded kernel may have from
    another, injected into the control after every step."""

    def __init__(self, dtype, seed=0):
        self.unit_roundoff = torch.finfo(dtype).eps / 2
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def __call__(self, model):
        for parameter in model.parameters():
            if parameter.is_floating_point():
                signs = torch.randint(0, 2, parameter.shape, generator=self.generator).to(parameter) * 2 - 1
                parameter.mul_(1 + self.unit_roundoff * signs)
        return model


class _Side:
    """One model of the pair with its optimizer, timing its steps."""

    def __init__(self, model, optimizer, device, dtype, channels_last):
        self.model, self.optimizer, self.device = model.to(device), optimizer, device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        self.seconds, self.last_loss = 0.0, float("nan")

    def step(self, inputs, targets, loss_fn):
        start = time.perf_counter()
        with self.autocast:
            loss = loss_fn(self.model(inputs.to(memory_format=self.memory_format)), targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss.item()  # .item() synchronises, so the time includes the whole step
        self.seconds += time.perf_counter() - start
        return self.last_loss

    @torch.no_grad()
    def accuracy(self, loader, loss_fn):
        self.model.eval()
        metrics = EpochMetrics()
        for inputs, targets in loader:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self.autocast:
                outputs = self.model(inputs.to(memory_format=self.memory_format))
            metrics.update(loss_fn(outputs.float(), targets), outputs, targets)
        self.model.train()
        return metrics.compute()["accuracy"]


def verify(model, train_loader, val_loader=None, *, epochs=1, optimizer="sgd", precision="32", device="cpu",
           channels_last=False, window=PARITY_WINDOW, max_steps=None, schedule=None, loss_fn=None, progress=True,
           model_kwargs=None, **optimizer_kwargs):
    """Train a fused model and its stock twin in lockstep and report how they compare.

    Args:
        model: a zoo name (``"vgg11"``: built with ``fused=True`` and ``fused=False``, stock weights copied into the
            fused one), a stock ``nn.Module`` (converted with ``fastcnn.convert``; the module itself is the stock
            side), or a ``(fused, stock)`` pair.
        train_loader, val_loader: batches of ``(images, labels)``; val_loader may be None.
        epochs (int): passes over train_loader.
        optimizer (str): ``"sgd"``, ``"adam"``, ``"adamw"`` or ``"adagrad"``: fastcnn.optim's on the fused side,
            torch.optim's on the stock side, both with ``optimizer_kwargs`` (e.g. ``lr=0.05, momentum=0.9``).
        precision (str): ``"32"`` or ``"bf16-mixed"``; selects the floor of the bound.
        device: where the models run.
        channels_last (bool): models and inputs in channels_last.
        window (int): the steps over which parity is judged (see :mod:`fastcnn.train.tolerances`).
        max_steps (int or None): stop after this many steps.
        schedule (str or None): a :mod:`fastcnn.train.schedules` name (``"cosine"``, ``"step"``, ...), applied alike to
            the three optimizers per step over the whole run; None: constant lr.
        loss_fn: default ``nn.CrossEntropyLoss()``.
        progress (bool): show a progress bar.
        model_kwargs (dict): arguments of the zoo factory (e.g. ``num_classes=10``).

    Returns:
        ParityReport: ``.passed``, ``.format()``, the per-step loss differences, throughputs and accuracies.

    Example:
        >>> train, val = fastcnn.data.digits()
        >>> report = verify("vgg11", make_loader(train, 32, shuffle=True), make_loader(val, 256),
        ...                 model_kwargs={"num_classes": 10}, lr=0.01, momentum=0.9)
        >>> print(report.format())
    """
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be one of {tuple(PRECISION_DTYPES)}, got {precision!r}")
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    device, dtype = torch.device(device), PRECISION_DTYPES[precision]
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    fused_model, stock_model = model_pair(model, **(model_kwargs or {}))
    if fused_model is stock_model:
        raise ValueError("the fused and the stock model must be two different modules")
    fused_model.load_state_dict(copy.deepcopy(stock_model.state_dict()))
    noise = RoundingNoise(dtype)
    control_model = noise(copy.deepcopy(stock_model))
    fused_optimizer, stock_optimizer = optimizer_pair(optimizer, fused_model.parameters(), stock_model.parameters(),
                                                      **optimizer_kwargs)
    control_optimizer = type(stock_optimizer)(control_model.parameters(), **optimizer_kwargs)
    sides = {"fused": _Side(fused_model, fused_optimizer, device, dtype, channels_last),
             "stock": _Side(stock_model, stock_optimizer, device, dtype, channels_last),
             # the other memory format: other kernels, other rounding (see fastcnn.train.tolerances)
             "control": _Side(control_model, control_optimizer, device, dtype, not channels_last)}
    total = len(train_loader) * epochs if max_steps is None else min(max_steps, len(train_loader) * epochs)
    schedulers = [build_scheduler(side.optimizer, schedule, total=total, step_size=max(1, total // 3))
                  for side in sides.values()] if schedule else []
    bar = ProgressBar(total, "verify fused vs stock", enabled=progress)
    differences, control_differences, images, at_window = [], [], 0, None
    for _ in range(epochs):
        for inputs, targets in train_loader:
            if len(differences) == total:
                break
            inputs, targets = inputs.to(device), targets.to(device)
            snapshot, losses = _rng_snapshot(device), {}
            for name, side in sides.items():  # all sides draw the same dropout masks
                _restore_rng(snapshot, device)
                losses[name] = side.step(inputs, targets, loss_fn)
            noise(control_model)
            for scheduler in schedulers:
                scheduler.step()
            scale = max(1.0, abs(losses["stock"]))
            differences.append(abs(losses["fused"] - losses["stock"]) / scale)
            control_differences.append(abs(losses["control"] - losses["stock"]) / scale)
            images += len(inputs)
            if len(differences) == min(window, total):
                at_window = (parameter_difference(fused_model, stock_model)[0],
                             parameter_difference(control_model, stock_model)[0])
            bar.update(loss=losses["stock"], diff=differences[-1])
    bar.close()
    if at_window is None:
        raise ValueError("train_loader gave no batches")
    final, worst_name = parameter_difference(fused_model, stock_model)
    report = ParityReport(dtype, window, differences, control_differences, at_window, final, worst_name,
                          {n: s.seconds for n, s in sides.items()}, images,
                          train_loss={n: s.last_loss for n, s in sides.items()})
    if val_loader is not None:
        report.val_accuracy = {name: sides[name].accuracy(val_loader, loss_fn) for name in ("fused", "stock")}
    return report


def _rng_snapshot(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _restore_rng(snapshot, device):
    torch.set_rng_state(snapshot[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(snapshot[1], device)
