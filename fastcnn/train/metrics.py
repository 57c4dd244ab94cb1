"""Epoch metrics accumulated as exact sums (loss, correct predictions, counts, a confusion matrix for mIoU), so that
sums from several processes add up to the metrics of the whole dataset."""
import torch
import torch.distributed as dist


class EpochMetrics:
    """Running sums of one epoch: mean loss, accuracy (per sample, or per pixel for segmentation) and mIoU.

    Args:
        num_classes (int or None): with a value, a ``num_classes × num_classes`` confusion matrix is kept and
            ``miou`` reported (segmentation).

    Example:
        >>> metrics = EpochMetrics()
        >>> metrics.update(loss, logits, targets); metrics.compute()
        {'loss': ..., 'accuracy': ...}
    """

    def __init__(self, num_classes=None):
        self.num_classes = num_classes
        # float64 sums: loss·batch, correct predictions, samples, predicted elements.
        self.sums = torch.zeros(4, dtype=torch.float64)
        self.confusion = torch.zeros(num_classes or 0, num_classes or 0, dtype=torch.float64)

    def update(self, loss, logits, targets):
        """Add one batch: ``loss`` its mean loss, ``logits`` (N, C, ...) and integer ``targets`` (N, ...)."""
        batch = targets.shape[0]
        predictions = logits.detach().argmax(1)
        correct = (predictions == targets).sum().item()
        self.sums += torch.tensor([loss.detach().float().item() * batch, correct, batch, targets.numel()],
                                  dtype=torch.float64)
        if self.num_classes:
            pairs = targets.reshape(-1).cpu() * self.num_classes + predictions.reshape(-1).cpu()
            self.confusion += torch.bincount(pairs, minlength=self.num_classes ** 2).reshape(
                self.num_classes, self.num_classes).double()

    def all_reduce(self):
        """Sum the counts over the default process group (a no-op outside torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            for name in ("sums", "confusion"):  # NCCL reduces GPU tensors only; gloo reduces CPU tensors
                tensor = getattr(self, name).to(device)
                dist.all_reduce(tensor)
                setattr(self, name, tensor.cpu())
        return self

    def compute(self):
        loss_sum, correct, samples, elements = self.sums.tolist()
        result = {"loss": loss_sum / max(samples, 1), "accuracy": correct / max(elements, 1), "samples": int(samples)}
        if self.num_classes:
            result["miou"] = mean_iou(self.confusion)
        return result


def mean_iou(confusion):
    """Mean over the classes present of TP / (TP + FP + FN), from ``confusion[target, prediction]``."""
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    return (true_positive[present] / union[present]).mean().item() if present.any() else float("nan")
