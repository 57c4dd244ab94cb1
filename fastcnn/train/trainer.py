"""A small, explicit training loop: epochs of a train loop and a validation loop over any model, optimizer and
loaders, with the usual switches and nothing done behind the user's back (samplers are used as given)."""
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn as nn

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import broadcast_buffers
from .log import ProgressBar, plot_history, write_logs
from .metrics import EpochMetrics
from .model_state import CheckpointError, load_model_state

PRECISIONS = ("32", "bf16-mixed")
SCHEDULER_INTERVALS = ("epoch", "step")
_REQUIRED = ("epoch", "model", "optimizer", "rng", "history")  # what fit(resume=...) needs of a checkpoint


def is_main_process():
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class Trainer:
    """Train ``model`` with ``optimizer`` on ``train_loader``, validating on ``val_loader`` after every epoch.

    Each epoch: ``sampler.set_epoch(epoch)`` when the train sampler has it (DistributedSampler), the train loop
    (forward under autocast, backward, every ``accumulate`` batches: clip, step, zero), the validation loop (on the
    unwrapped model, metrics summed over processes), the epoch scheduler step, the log and the checkpoint.

    Args:
        model (nn.Module): the model, or a DistributedDataParallel wrapping it.
        optimizer (torch.optim.Optimizer): over the model's parameters.
        train_loader, val_loader: iterables of ``(inputs, targets)`` or ``(inputs, target, *more_targets)`` (the
            segmentation sets' ``(image, mask, label)``); val_loader may be None.
        loss_fn: ``loss_fn(outputs, *targets)``, default ``nn.CrossEntropyLoss()`` (classification and, with
            (N, H, W) targets, segmentation). Metrics use the first output and the first target.
        scheduler: a ``torch.optim.lr_scheduler`` object (see :mod:`fastcnn.train.schedules`), stepped once per
            ``scheduler_interval`` (``"epoch"`` or ``"step"``, i.e. per optimizer step).
        device: where to train (default: the model's device).
        precision (str): ``"32"`` or ``"bf16-mixed"`` (bfloat16 autocast, on CPU and GPU).
        channels_last (bool): model and inputs in ``torch.channels_last``.
        grad_clip (float or None): clip the gradients' global L2 norm to this.
        accumulate (int): batches per optimizer step (their loss is averaged).
        num_classes (int or None): set for segmentation to report mIoU.
        checkpoint_path (str or None): write a checkpoint here after every epoch (atomically).
        log_dir (str or None): write ``log.csv``, ``log.json`` and PNG plots of the curves here.
        progress (bool): show a progress bar with ETA (the per-epoch metric line is printed either way).
        callbacks: callables ``callback(trainer, record)`` run after each epoch's checkpoint.

    Example:
        >>> trainer = Trainer(model, fastcnn.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        ...                   train_loader, val_loader, precision="bf16-mixed", checkpoint_path="run/last.pt")
        >>> history = trainer.fit(epochs=10)                      # later: trainer.fit(10, resume="run/last.pt")
    """

    def __init__(self, model, optimizer, train_loader, val_loader=None, *, loss_fn=None, scheduler=None,
                 scheduler_interval="epoch", device=None, precision="32", channels_last=False, grad_clip=None,
                 accumulate=1, num_classes=None, checkpoint_path=None, log_dir=None, progress=True, callbacks=()):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if scheduler_interval not in SCHEDULER_INTERVALS:
            raise ValueError(f"scheduler_interval must be one of {SCHEDULER_INTERVALS}, got {scheduler_interval!r}")
        if not (isinstance(accumulate, int) and accumulate >= 1):
            raise ValueError(f"accumulate must be an int >= 1, got {accumulate!r}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be None or > 0, got {grad_clip!r}")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.train_loader, self.val_loader = train_loader, val_loader
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self.scheduler_interval, self.precision, self.channels_last = scheduler_interval, precision, channels_last
        self.grad_clip, self.accumulate, self.num_classes = grad_clip, accumulate, num_classes
        self.checkpoint_path, self.log_dir, self.callbacks = checkpoint_path, log_dir, list(callbacks)
        self.device = torch.device(device) if device is not None else next(self.module.parameters()).device
        self.progress = progress and is_main_process()
        self.history = []
        # The newest complete checkpoint (the resumed one until this run writes its own): what a stopped run
        # continues from.
        self.last_checkpoint = None
        self.module.to(self.device)
        if channels_last:
            self.module.to(memory_format=torch.channels_last)

    def fit(self, epochs, resume=None):
        """Train until ``epochs`` epochs are done; ``resume`` a checkpoint path to continue from its next epoch
        (exactly the run an uninterrupted ``fit`` would have made). Returns the history: one dict per epoch.

        A KeyboardInterrupt (Ctrl-C) closes the progress bars and propagates; checkpoints and logs are written
        atomically, so ``last_checkpoint`` is complete and resumable."""
        start = 0
        if resume:
            start = self.load_state_dict(load_checkpoint(resume, required=_REQUIRED), source=resume)
            self.last_checkpoint = resume
        try:
            for epoch in range(start, epochs):
                began = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                train = self.train_epoch(epoch, epochs)
                record = {"epoch": epoch + 1, "lr": lr, **{f"train_{k}": v for k, v in train.items()}}
                if self.val_loader is not None:
                    record |= {f"val_{k}": v for k, v in self.validate().items()}
                record["seconds"] = time.perf_counter() - began
                if self.scheduler is not None and self.scheduler_interval == "epoch":
                    self.scheduler.step()
                self.history.append(record)
                self.end_epoch(epoch, record)
        except KeyboardInterrupt:
            ProgressBar.close_all()
            raise
        return self.history

    def end_epoch(self, epoch, record):
        if is_main_process():
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            if self.checkpoint_path:
                save_checkpoint(self.checkpoint_path, self.state_dict(epoch))
                self.last_checkpoint = self.checkpoint_path
            if self.log_dir:
                write_logs(self.history, self.log_dir)
                plot_history(self.history, self.log_dir)
        for callback in self.callbacks:
            callback(self, record)

    def autocast(self):
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def to_device(self, batch):
        """``(inputs, target, *more)`` on the device; segmentation sets give (image, mask, label), whose loss
        (e.g. a multi-task one) is called as ``loss_fn(outputs, mask, label)``."""
        inputs, *targets = batch
        memory_format = torch.channels_last if self.channels_last and inputs.dim() == 4 else torch.preserve_format
        non_blocking = self.device.type == "cuda"
        inputs = inputs.to(self.device, non_blocking=non_blocking, memory_format=memory_format)
        return inputs, [target.to(self.device, non_blocking=non_blocking) for target in targets]

    def loss_and_metrics(self, outputs, targets, metrics):
        """The loss; metrics follow the first output (a multi-task model's dense logits) and the first target."""
        loss = self.loss_fn(outputs, *targets)
        metrics.update(loss, outputs[0] if isinstance(outputs, (tuple, list)) else outputs, targets[0])
        return loss

    def train_epoch(self, epoch, epochs=None):
        """One pass over the train loader; returns its metrics (means over the epoch, summed over processes)."""
        self.model.train()
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        metrics, batches = EpochMetrics(self.num_classes), len(self.train_loader)
        bar = ProgressBar(batches, f"epoch {epoch + 1}/{epochs or '?'} train", enabled=self.progress)
        self.optimizer.zero_grad(set_to_none=True)
        for index, batch in enumerate(self.train_loader):
            inputs, targets = self.to_device(batch)
            group_start = index - index % self.accumulate
            group_size = min(self.accumulate, batches - group_start)
            steps_now = index + 1 == group_start + group_size
            # Inside an accumulation group DDP must not all-reduce yet; the group's last backward does it.
            sync = nullcontext() if steps_now or self.model is self.module else self.model.no_sync()
            with sync:
                with self.autocast():
                    loss = self.loss_and_metrics(self.model(inputs), targets, metrics)
                (loss / group_size).backward()
            if steps_now:
                self.optimizer_step()
            bar.update(loss=loss.item())
        bar.close()
        return metrics.all_reduce().compute()

    def optimizer_step(self):
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and self.scheduler_interval == "step":
            self.scheduler.step()

    @torch.no_grad()
    def validate(self):
        """The validation loop on the unwrapped model, with process 0's buffers (the saved model's); metrics are
        exact sums over all processes' shards."""
        broadcast_buffers(self.module)
        self.module.eval()
        metrics = EpochMetrics(self.num_classes)
        bar = ProgressBar(len(self.val_loader), "  validate", enabled=self.progress)
        for batch in self.val_loader:
            inputs, targets = self.to_device(batch)
            with self.autocast():
                self.loss_and_metrics(self.module(inputs), targets, metrics)
            bar.update()
        bar.close()
        return metrics.all_reduce().compute()

    def state_dict(self, epoch):
        """Everything needed to continue after ``epoch`` (0-based) exactly as if never stopped."""
        state = {"epoch": epoch, "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "optimizer_class": type(self.optimizer).__name__, "rng": rng_state(), "history": self.history}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state, source="the checkpoint"):
        """Restore a :meth:`state_dict`; returns the epoch to continue from. A state of another model, optimizer or
        schedule raises :class:`~fastcnn.train.model_state.CheckpointError` naming ``source`` and the difference."""
        load_model_state(self.module, state["model"], source)
        saved, ours = state.get("optimizer_class"), type(self.optimizer).__name__
        if saved is not None and saved != ours:
            raise CheckpointError(f"{source} was trained with the {saved} optimizer, this run uses {ours}")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as error:  # torch's message for parameter groups of another size
            raise CheckpointError(f"{source}: its optimizer state does not fit this {ours}: {error}") from None
        if self.scheduler is not None:
            if "scheduler" not in state:
                raise CheckpointError(f"{source} has no scheduler state but this run has a scheduler")
            self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.history = list(state["history"])
        return state["epoch"] + 1
