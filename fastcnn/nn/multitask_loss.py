"""The multi-task loss of the encoder-decoder: classification cross-entropy plus a mask loss (cross-entropy and/or
soft Dice), weighted."""
import torch.nn as nn
import torch.nn.functional as F


def soft_dice_loss(seg_logits, masks, eps=1.0):
    """``1 - mean_c (2 |P_c ∩ T_c| + eps) / (|P_c| + |T_c| + eps)`` with ``P = softmax(seg_logits)`` and ``T`` the
    one-hot masks, sums over batch and pixels (the smoothed multi-class Dice of V-Net / smp)."""
    probs = seg_logits.float().softmax(1)
    target = F.one_hot(masks, seg_logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    overlap = (probs * target).sum(dims)
    return 1 - ((2 * overlap + eps) / (probs.sum(dims) + target.sum(dims) + eps)).mean()


class MultiTaskLoss(nn.Module):
    """``cls_weight * CE(cls_logits, labels) + seg_weight * CE(seg_logits, masks) + dice_weight * Dice``.

    Either head may be absent (pass None for its logits and target); its terms are then skipped.

    Args:
        cls_weight, seg_weight, dice_weight: term weights (defaults 1, 1, 0).

    Shape:
        seg_logits ``(N, K, H, W)``, masks ``(N, H, W)`` int64; cls_logits ``(N, C)``, labels ``(N,)`` int64.
        Returns ``(total, {"cls": ..., "seg": ..., "dice": ...})`` with the (detached) terms that were computed.

    Example:
        >>> loss, parts = MultiTaskLoss(dice_weight=0.5)(seg_logits, masks, cls_logits, labels)
    """

    def __init__(self, cls_weight=1.0, seg_weight=1.0, dice_weight=0.0):
        super().__init__()
        self.cls_weight, self.seg_weight, self.dice_weight = cls_weight, seg_weight, dice_weight

    def forward(self, seg_logits, masks, cls_logits=None, labels=None):
        terms = {}
        if seg_logits is not None:
            terms["seg"] = (self.seg_weight, F.cross_entropy(seg_logits, masks))
            if self.dice_weight:
                terms["dice"] = (self.dice_weight, soft_dice_loss(seg_logits, masks))
        if cls_logits is not None:
            terms["cls"] = (self.cls_weight, F.cross_entropy(cls_logits, labels))
        if not terms:
            raise ValueError("fastcnn: MultiTaskLoss needs seg_logits or cls_logits")
        total = sum(weight * value for weight, value in terms.values())
        return total, {name: value.detach() for name, (_, value) in terms.items()}


__all__ = ["MultiTaskLoss", "soft_dice_loss"]
