"""Parity verification: a fused model and its stock twin, the same weights, the same batches, fastcnn's optimizer
and torch.optim's, in a teacher-forced lockstep; a report of how far apart each step takes them, how their evaluation
outputs compare and how fast each runs.

The fused model is checked twice over: as ``fused``, every block on fastcnn's kernels (also where a module route
sends a block to its stock layers for speed on this device: `fastcnn.nn.skip_stock_routes`), and as ``routed``, a
copy that runs as a user's model does, routes on. The stock model trains. Before every step both fused sides and a
control (a copy of the stock model in the other memory format: the same math through other kernels, as the fused
model is) are given the stock model's exact state; then all four run the step (forward under the same autocast,
loss, backward, their optimizer's step) on the same batch from the same RNG state (so dropout masks agree). Per step
each fused side's and the control's differences from the stock model are recorded: the loss, the BatchNorm running
statistics after the step, the parameters after the step. At two checkpoints (half way and at the end) both fused
sides' evaluation outputs on the validation set, given the fused model's state, are compared with those of a stock
copy given the same state (the control, given it too, again measures rounding), with the validation metrics.
Pass/fail by the rule of :mod:`fastcnn.train.tolerances`.
"""
import contextlib
import copy
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..ops import skip_stock_routes
from .metrics import EpochMetrics
from .schedules import build_scheduler
from .tolerances import PARITY_FACTOR, PARITY_FLOOR, PARITY_WINDOW, PRECISION_DTYPES, STEP_STATISTIC, parity_bound

OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad")
JUDGED = ("fused", "routed")  # the sides held to the bound: fastcnn's kernels everywhere, and as routed
COMPARED = (*JUDGED, "control")  # the sides whose differences from stock are recorded (the control as yardstick)
SPEED_LABELS = {"routed": "fastcnn as your model runs (routes on)",
                "fused": "fastcnn's kernels everywhere (stock routes skipped)"}


def _label(side, name):
    """A check's name: the fused side's plain, the routed side's prefixed."""
    return name if side == "fused" else f"{side}: {name}"


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
class Check:
    """One comparison of the report: the fused model's difference, the control's, and the bound they give."""

    name: str
    fused: float
    control: float
    bound: float

    @property
    def passed(self):
        return self.fused <= self.bound

    def format(self):
        return (f"  {self.name:<44} fastcnn {self.fused:9.3g}  control {self.control:9.3g}  bound {self.bound:9.3g}  "
                f"{'ok' if self.passed else 'FAIL'}")


@dataclass
class ParityReport:
    """What :func:`verify` measured. ``steps[q][side]``: per-step differences from the stock model of quantity q
    (``loss``, ``buffers``, ``updates``; see :mod:`fastcnn.train.tolerances`) for the sides ``fused`` (fastcnn's
    kernels everywhere), ``routed`` (the fused model as it runs, routes on; optional) and ``control``;
    ``evaluations``: the checkpoint ``Check``s; ``seconds``: per side the time of its training steps;
    ``validation``: per side the final validation metrics (``fused`` and ``routed``: the fused model's state on
    either path, ``fused in stock``: a stock copy with that state, ``stock``: the stock model)."""

    dtype: torch.dtype
    window: int
    steps: dict
    evaluations: list
    seconds: dict
    images: int
    train_loss: dict
    validation: dict = field(default_factory=dict)
    fewest_batch_norm_values: tuple = None

    @property
    def loss_differences(self):
        return self.steps["loss"]["fused"]

    @property
    def control_differences(self):
        return self.steps["loss"]["control"]

    @property
    def val_accuracy(self):
        return {side: metrics["accuracy"] for side, metrics in self.validation.items()}

    def checks(self):
        """Each judged side's per-step checks (over the first ``window`` steps), then the evaluation checks."""
        step_checks = []
        for side in JUDGED:
            for quantity, values in self.steps.items():
                if side not in values:
                    continue
                pick = max if STEP_STATISTIC[quantity] == "max" else statistics.median
                value, control = pick(values[side][:self.window]), pick(values["control"][:self.window])
                step_checks.append(Check(_label(side, f"{quantity} ({STEP_STATISTIC[quantity]} over steps)"), value,
                                         control, parity_bound(control, self.dtype)))
        return step_checks + list(self.evaluations)

    @property
    def passed(self):
        return all(check.passed for check in self.checks())

    def throughput(self, side):
        return self.images / self.seconds[side]

    def format(self):
        """The report as text: verdict, every check against its bound, validation metrics and speed."""
        judged = min(self.window, len(self.loss_differences))
        lines = [f"parity ({self.dtype}, teacher-forced lockstep, {judged} steps judged of "
                 f"{len(self.loss_differences)}; fused <= {PARITY_FACTOR:g} x control + {PARITY_FLOOR[self.dtype]:g}"
                 f"): {'PASS' if self.passed else 'FAIL'}"]
        lines += [check.format() for check in self.checks()]
        updates = self.steps["updates"]
        worst = max(range(len(updates["fused"])), key=updates["fused"].__getitem__)
        lines.append(f"  largest one-step parameter difference: fused {updates['fused'][worst]:.3g} at step "
                     f"{worst + 1}, control {max(updates['control']):.3g} (a step's can be large: see "
                     "fastcnn.train.tolerances)")
        if self.fewest_batch_norm_values:
            count, name = self.fewest_batch_norm_values
            lines.append(f"  fewest values per BatchNorm channel in training: {count} ({name})")
        for side, metrics in self.validation.items():
            lines.append(f"  {side}: validation accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}")
        timed = [side for side in ("routed", "fused", "stock") if side in self.seconds]
        for side in timed:
            lines.append(f"  {side}: {self.throughput(side):.1f} images/s training, final train loss "
                         f"{self.train_loss[side]:.4f}")
        speeds = [f"{SPEED_LABELS[side]} {self.seconds['stock'] / self.seconds[side]:.2f}x stock" for side in timed
                  if side != "stock"]
        lines.append(f"  speed (training steps: forward, backward, optimizer): {'; '.join(speeds)}")
        return "\n".join(lines)


def _relative(value, reference):
    """max|value - reference| / max(1, max|reference|), NaN where both are NaN counting as equal and NaN in one as
    infinitely far; integer tensors: 0 if equal, else inf."""
    value, reference = torch.as_tensor(value).detach(), torch.as_tensor(reference).detach()
    if not reference.numel():
        return 0.0
    if not reference.is_floating_point():
        return 0.0 if torch.equal(value, reference) else float("inf")
    value, reference = value.double(), reference.double()
    both_nan = torch.isnan(value) & torch.isnan(reference)
    difference = torch.where(both_nan, 0.0, (value - reference).abs()).nan_to_num(nan=float("inf"))
    return difference.max().item() / max(1.0, reference.nan_to_num().abs().max().item())


def state_difference(model, reference, kind="parameters"):
    """max over named parameters (or buffers) of their `_relative` difference from ``reference``'s."""
    references = dict(getattr(reference, f"named_{kind}")())
    return max((_relative(value, references[name]) for name, value in getattr(model, f"named_{kind}")()),
               default=0.0)


class _Side:
    """One model with its optimizer (None for the evaluation-only twin), timing its training steps; ``routes``: the
    context its forward and backward run in (`skip_stock_routes` for fastcnn's kernels everywhere)."""

    def __init__(self, model, optimizer, device, dtype, channels_last, routes=contextlib.nullcontext):
        self.model, self.optimizer, self.device, self.routes = model.to(device), optimizer, device, routes
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        self.seconds, self.last_loss = 0.0, float("nan")

    def __call__(self, inputs):
        with self.routes(), self.autocast:
            return self.model(inputs.to(memory_format=self.memory_format))

    def step(self, inputs, targets, loss_fn):
        start = time.perf_counter()
        loss = loss_fn(self(inputs), targets)
        with self.routes():
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss.item()  # .item() synchronises, so the time includes the whole step
        self.seconds += time.perf_counter() - start
        return self.last_loss

    def take_state(self, source):
        """Parameters, buffers and optimizer state copied from ``source`` (in place: each side keeps its layouts)."""
        self.model.load_state_dict(source.model.state_dict())
        sources = dict(source.model.named_parameters())
        for name, param in self.model.named_parameters():
            state, source_state = self.optimizer.state[param], source.optimizer.state.get(sources[name], {})
            for key in set(state) - set(source_state):
                del state[key]
            for key, value in source_state.items():
                if torch.is_tensor(value) and torch.is_tensor(state.get(key)) and state[key].shape == value.shape:
                    state[key].copy_(value)
                else:
                    state[key] = value.clone() if torch.is_tensor(value) else copy.deepcopy(value)


def _fewest_batch_norm_values(model):
    """Hooks recording the fewest values per channel any train-mode BatchNorm of ``model`` normalises, and their
    remover. Returns (record, remove); ``record`` holds [(count, name)] after a forward."""
    record, handles = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            def hook(module, inputs, name=name):
                if module.training and inputs[0].dim() > 1:
                    record.append((inputs[0].numel() // inputs[0].shape[1], name))
            handles.append(module.register_forward_pre_hook(hook))

    def remove():
        for handle in handles:
            handle.remove()

    return record, remove


@torch.no_grad()
def _evaluate(step, sides, batches, loss_fn, dtype, bar):
    """Eval-mode outputs of the fused model on either path (``fused``, ``routed``: given the fused model's state)
    against ``fused in stock`` (a stock copy given that state), the control (given it too) measuring rounding;
    returns (checks, metrics per side)."""
    state = sides["fused"].model.state_dict()
    for name in ("routed", "fused in stock", "control"):
        sides[name].model.load_state_dict(state)
    modes = [(module, module.training) for side in sides.values() for module in side.model.modules()]
    for side in sides.values():
        side.model.eval()
    metrics = {name: EpochMetrics() for name in sides}
    largest, scale, margins = {name: 0.0 for name in COMPARED}, 0.0, {name: [] for name in JUDGED}
    for inputs, targets in batches:
        inputs, targets = inputs.to(sides["fused"].device), targets.to(sides["fused"].device)
        outputs = {name: side(inputs).float() for name, side in sides.items()}
        for name, output in outputs.items():
            metrics[name].update(loss_fn(output, targets), output, targets)
        reference = outputs["fused in stock"]
        for name in largest:
            largest[name] = max(largest[name], (outputs[name] - reference).abs().max().item())
        scale = max(scale, reference.abs().max().item())
        if reference.dim() == 2 and reference.shape[1] > 1:  # stock's top-two margins where the predictions differ
            for name in JUDGED:
                top2 = reference[outputs[name].argmax(1) != reference.argmax(1)].topk(2, dim=1).values
                margins[name] += (top2[:, 0] - top2[:, 1]).tolist()
        bar.update(1)
    for module, training in modes:
        module.train(training)
    scale = max(1.0, scale)
    control = largest["control"] / scale
    bound = parity_bound(control, dtype)
    checks = []
    for name in JUDGED:
        # Outputs within `bound * scale` of stock's can change a prediction only where stock's top two are within
        # twice that; any other changed prediction is a real difference.
        beyond = sum(margin > 2 * bound * scale for margin in margins[name])
        checks += [Check(_label(name, f"eval outputs at step {step}"), largest[name] / scale, control, bound),
                   Check(_label(name, f"eval predictions at step {step} (count)"), float(beyond), 0.0, 0.0)]
    return checks, {name: metric.compute() for name, metric in metrics.items() if name != "control"}


class _NoBar:
    def update(self, *args, **kwargs):
        pass

    set_postfix = close = update


def _progress_bar(enabled, **options):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(**options)


def verify(model, train_loader, val_loader=None, *, epochs=1, optimizer="sgd", precision="32", device="cpu",
           channels_last=False, window=PARITY_WINDOW, max_steps=None, schedule=None, loss_fn=None, progress=True,
           model_kwargs=None, **optimizer_kwargs):
    """Train a fused model and its stock twin in a teacher-forced lockstep and report how they compare.

    The fused model is judged on two paths: ``fused``, fastcnn's kernels in every module, also where a module route
    table sends a block to its stock layers for speed on this device (`fastcnn.nn.skip_stock_routes`), and
    ``routed``, a copy running as a user's model does. The speed line times both against stock.

    Args:
        model: a zoo name (``"vgg11"``: built with ``fused=True`` and ``fused=False``, stock weights copied into the
            fused one), a stock ``nn.Module`` (converted with ``fastcnn.convert``; the module itself is the stock
            side), or a ``(fused, stock)`` pair. The fused model ends with its own last step's state.
        train_loader, val_loader: batches of ``(images, labels)``; without val_loader the evaluation checks use the
            first training batch.
        epochs (int): passes over train_loader.
        optimizer (str): ``"sgd"``, ``"adam"``, ``"adamw"`` or ``"adagrad"``: fastcnn.optim's on the fused side,
            torch.optim's on the stock side, both with ``optimizer_kwargs`` (e.g. ``lr=0.05, momentum=0.9``).
        precision (str): ``"32"`` or ``"bf16-mixed"``; selects the floor of the bound.
        device: where the models run.
        channels_last (bool): models and inputs in channels_last (the control then runs NCHW).
        window (int or None): judge the first ``window`` steps only (None: every step).
        max_steps (int or None): stop after this many steps.
        schedule (str or None): a :mod:`fastcnn.train.schedules` name (``"cosine"``, ``"step"``, ...), applied alike to
            the three optimizers per step over the whole run; None: constant lr.
        loss_fn: default ``nn.CrossEntropyLoss()``.
        progress (bool): tqdm progress bars (training steps, evaluation batches); False: none.
        model_kwargs (dict): arguments of the zoo factory (e.g. ``num_classes=10``).

    Returns:
        ParityReport: ``.passed``, ``.format()``, ``.checks()``, the per-step differences, metrics and speeds.

    Example:
        >>> train, val = fastcnn.data.digits()
        >>> report = verify("vgg11", make_loader(train, 32, shuffle=True), make_loader(val, 256),
        ...                 model_kwargs={"num_classes": 10}, lr=0.01, momentum=0.9)
        >>> print(report.format())
    """
    if precision not in PRECISION_DTYPES:
        raise ValueError(f"precision must be one of {tuple(PRECISION_DTYPES)}, got {precision!r}")
    if not (window is None or (isinstance(window, int) and window >= 1)):
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    device, dtype = torch.device(device), PRECISION_DTYPES[precision]
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    fused_model, stock_model = model_pair(model, **(model_kwargs or {}))
    if fused_model is stock_model:
        raise ValueError("the fused and the stock model must be two different modules")
    fused_model.load_state_dict(copy.deepcopy(stock_model.state_dict()))
    control_model = copy.deepcopy(stock_model)
    fused_optimizer, stock_optimizer = optimizer_pair(optimizer, fused_model.parameters(), stock_model.parameters(),
                                                      **optimizer_kwargs)
    control_optimizer = type(stock_optimizer)(control_model.parameters(), **optimizer_kwargs)
    routed_model = copy.deepcopy(fused_model)
    routed_optimizer = type(fused_optimizer)(routed_model.parameters(), **optimizer_kwargs)
    sides = {"fused": _Side(fused_model, fused_optimizer, device, dtype, channels_last, routes=skip_stock_routes),
             "stock": _Side(stock_model, stock_optimizer, device, dtype, channels_last),
             # the other memory format: other kernels, other rounding (see fastcnn.train.tolerances)
             "control": _Side(control_model, control_optimizer, device, dtype, not channels_last),
             "routed": _Side(routed_model, routed_optimizer, device, dtype, channels_last)}
    twin = _Side(copy.deepcopy(stock_model), None, device, dtype, channels_last)
    total = len(train_loader) * epochs if max_steps is None else min(max_steps, len(train_loader) * epochs)
    schedulers = [build_scheduler(side.optimizer, schedule, total=total, step_size=max(1, total // 3))
                  for side in sides.values()] if schedule else []
    checkpoints = {max(1, (total + 1) // 2), total}  # a second evaluation catches state the first left stale
    steps = {quantity: {side: [] for side in COMPARED} for quantity in STEP_STATISTIC}
    evaluations, validation, images, probe = [], {}, 0, None
    bn_record, remove_hooks = _fewest_batch_norm_values(stock_model)
    bar = _progress_bar(progress, total=total, desc="verify fused vs stock", unit="step")
    for _ in range(epochs):
        for inputs, targets in train_loader:
            if len(steps["loss"]["fused"]) == total:
                break
            inputs, targets = inputs.to(device), targets.to(device)
            probe = probe or [(inputs, targets)]
            for name in COMPARED:  # every step starts from the stock model's exact state
                sides[name].take_state(sides["stock"])
            snapshot, losses = _rng_snapshot(device), {}
            for name, side in sides.items():  # all sides draw the same dropout masks
                _restore_rng(snapshot, device)
                losses[name] = side.step(inputs, targets, loss_fn)
            if remove_hooks is not None:  # the first step's forward has recorded the BatchNorm sizes
                remove_hooks = remove_hooks()
            for scheduler in schedulers:
                scheduler.step()
            for name in COMPARED:
                steps["loss"][name].append(_relative(losses[name], losses["stock"]))
                for quantity, kind in (("buffers", "buffers"), ("updates", "parameters")):
                    steps[quantity][name].append(state_difference(sides[name].model, stock_model, kind))
            images += len(inputs)
            done = len(steps["loss"]["fused"])
            bar.set_postfix(loss=f"{losses['stock']:.4g}", diff=f"{steps['loss']['fused'][-1]:.2g}", refresh=False)
            bar.update(1)
            if done in checkpoints:
                batches = val_loader if val_loader is not None else probe
                eval_sides = {"fused": sides["fused"], "routed": sides["routed"], "fused in stock": twin,
                              "control": sides["control"]}
                if done == total:
                    eval_sides["stock"] = sides["stock"]
                eval_bar = _progress_bar(progress, total=len(batches), desc="evaluate", unit="batch", leave=False)
                checks, validation = _evaluate(done, eval_sides, batches, loss_fn, dtype, eval_bar)
                eval_bar.close()
                evaluations += checks
    bar.close()
    if not steps["loss"]["fused"]:
        raise ValueError("train_loader gave no batches")
    return ParityReport(dtype, window or total, steps, evaluations, {n: s.seconds for n, s in sides.items()}, images,
                        {n: s.last_loss for n, s in sides.items()}, validation, min(bn_record, default=None))


def _rng_snapshot(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _restore_rng(snapshot, device):
    torch.set_rng_state(snapshot[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(snapshot[1], device)
