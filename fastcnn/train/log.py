"""What a run reports: a progress bar with ETA, a CSV and a JSON log of the per-epoch metrics, and PNG plots."""
import csv
import json
import os
import sys
import time


class ProgressBar:
    """A one-line text progress bar with rate and ETA, redrawn in place (``\\r``) on ``stream``.

    Example:
        >>> bar = ProgressBar(len(loader), "epoch 1 train")
        >>> for batch in loader: ...; bar.update(loss=loss.item())
        >>> bar.close()
    """

    def __init__(self, total, description="", stream=None, enabled=True, width=24):
        self.total, self.description, self.width = total, description, width
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.count, self.start, self.last_draw = 0, time.perf_counter(), 0.0

    def update(self, steps=1, **values):
        self.count += steps
        now = time.perf_counter()
        if self.enabled and (now - self.last_draw > 0.2 or self.count == self.total):
            self.last_draw = now
            self.stream.write("\r" + self.line(now, values))
            self.stream.flush()

    def line(self, now, values):
        elapsed = now - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.count) / rate if rate > 0 else float("inf")
        filled = round(self.width * self.count / max(self.total, 1))
        shown = " ".join(f"{key} {value:.4g}" for key, value in values.items())
        return (f"{self.description} [{'#' * filled}{'.' * (self.width - filled)}] {self.count}/{self.total} "
                f"{rate:.1f} it/s ETA {format_seconds(eta)} {shown}")

    def close(self):
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def format_seconds(seconds):
    if seconds == float("inf"):
        return "?"
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}:{seconds:02d}"


def write_logs(history, folder):
    """Write ``history`` (one dict per epoch) to ``folder/log.csv`` and ``folder/log.json``; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    csv_path, json_path = os.path.join(folder, "log.csv"), os.path.join(folder, "log.json")
    columns = list(dict.fromkeys(key for record in history for key in record))
    with open(csv_path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    with open(json_path, "w") as file:
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
        figure.savefig(paths[-1], dpi=100)
        plt.close(figure)
    return paths
