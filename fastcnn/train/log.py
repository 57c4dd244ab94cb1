"""What a run reports: a progress bar with ETA, a CSV and a JSON log of the per-epoch metrics, and PNG plots."""
import csv
import json
import os
import sys
import weakref

from .checkpoint import atomic_write


class ProgressBar:
    """A tqdm progress bar (rate, ETA, the latest loss) that the trainer and ``verify`` share.

    tqdm handles what a hand-made ``\\r`` bar did not: terminal width, and output that is not a terminal (a log file,
    a CI job), where the bar is left out (``disable=None``) so logs hold the per-epoch lines, not redraws.

    Args:
        total (int): expected updates (batches).
        description (str): text before the bar.
        stream: where to draw (default stderr).
        enabled (bool): False draws nothing.

    Example:
        >>> bar = ProgressBar(len(loader), "epoch 1 train")
        >>> for batch in loader: ...; bar.update(loss=loss.item())
        >>> bar.close()
    """

    # Bars not yet closed: an interrupted run closes them so its last message starts on a line of its own.
    _open = weakref.WeakSet()

    def __init__(self, total, description="", stream=None, enabled=True):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=description, file=stream or sys.stderr, disable=None,
                            dynamic_ncols=True, leave=True)
            ProgressBar._open.add(self)

    def update(self, steps=1, **values):
        if self.bar is not None:
            if values:
                self.bar.set_postfix({key: f"{value:.4g}" for key, value in values.items()}, refresh=False)
            self.bar.update(steps)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            ProgressBar._open.discard(self)

    @classmethod
    def close_all(cls):
        """Close every bar still open (after an interruption)."""
        for bar in list(cls._open):
            bar.close()


def write_logs(history, folder):
    """Write ``history`` (one dict per epoch) to ``folder/log.csv`` and ``folder/log.json``; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    csv_path, json_path = os.path.join(folder, "log.csv"), os.path.join(folder, "log.json")
    columns = list(dict.fromkeys(key for record in history for key in record))
    # Atomic, as the checkpoint: a Ctrl-C mid-write leaves the previous complete log, never half of one.
    with atomic_write(csv_path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    with atomic_write(json_path, "w") as file:
        json.dump(history, file, indent=1)
    return csv_path, json_path


def plot_history(history, folder):
    """Save ``loss.png``, ``accuracy.png`` and ``lr.png`` (train and validation curves over epochs) in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    epochs = [record["epoch"] for record in history]
    paths = []
    for metric, label in (("loss", "loss"), ("accuracy", "accuracy"), ("lr", "learning rate")):
        figure, axes = plt.subplots(figsize=(5, 3.5))
        for prefix in ("train_", "val_", ""):
            values = [record.get(prefix + metric) for record in history]
            if any(value is not None for value in values):
                axes.plot(epochs, values, marker="o", label=(prefix.rstrip("_") or metric))
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.legend()
        figure.tight_layout()
        paths.append(os.path.join(folder, f"{metric}.png"))
        with atomic_write(paths[-1]) as file:
            figure.savefig(file, format="png", dpi=100)
        plt.close(figure)
    return paths
