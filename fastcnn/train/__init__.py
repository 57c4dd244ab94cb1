"""Training: the Trainer, checkpoints, learning-rate schedules, parity verification of fused against stock models,
distributed helpers and class activation maps."""
from .checkpoint import load_checkpoint, save_checkpoint, seed_everything
from .metrics import EpochMetrics, mean_iou
from .trainer import Trainer

__all__ = ["EpochMetrics", "Trainer", "load_checkpoint", "mean_iou", "save_checkpoint", "seed_everything"]
