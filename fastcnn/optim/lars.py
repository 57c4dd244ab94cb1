"""fastcnn.optim.LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017) as fused ops: fastcnn::lars_
for the adapted tensors and fastcnn::sgd_ (SGD-momentum, no weight decay) for the excluded ones."""
import torch

from ..ops import optim as ops
from ._fused import FusedOptimizer, lr_arguments, scalar
from .sgd import split_first_step

_TRUST_NORMS = ("weight", "update")


def exclude_bias_and_norm(p):
    """LARS's default exclusion: tensors with at most one dimension (biases, BatchNorm/LayerNorm weights)."""
    return p.ndim <= 1


class LARS(FusedOptimizer, torch.optim.Optimizer):
    """LARS: SGD with momentum on a per-tensor trust-ratio-scaled update, for large-batch training.

    For each tensor that ``exclude`` does not exclude (β = weight_decay, η = trust_coefficient, μ = momentum):
    λ = η‖w‖ / (‖g‖ + β‖w‖ + ε), or η‖w‖ / (‖g + βw‖ + ε) with ``trust_norm="update"`` (λ = 1 when either norm is
    0; with ``trust_clip`` (LARC) λ = min(λ / lr, 1)); d = λ (g + βw); b = d on the first step, else
    b = μ b + (1 − dampening) d; d = d + μ b (Nesterov) or b; w = w − lr d. With ``lr_in_momentum`` the learning
    rate enters the buffer instead (b = μ b + lr d; w = w − b), as in the paper and TF/MXNet. Excluded tensors get
    plain SGD-momentum with the same momentum/dampening/Nesterov and no weight decay (their buffer holds d, not
    lr·d, also with ``lr_in_momentum``). Norms are computed in float32 from the unscaled gradient.

    Args:
        params (iterable): parameters or param groups.
        lr (float or Tensor): learning rate (required); a 1-element tensor is read on the device.
        momentum (float): μ (default 0.9).
        dampening (float): dampening of the momentum (default 0).
        weight_decay (float): β (default 0), applied inside the trust-ratio-scaled update.
        nesterov (bool): Nesterov momentum (default False).
        trust_coefficient (float): η (default 0.001).
        eps (float): ε in the trust ratio's denominator (default 1e-8).
        trust_clip (bool): LARC's clipping, λ = min(λ / lr, 1) (default False).
        trust_norm (str): "weight" (default: ‖g‖ + β‖w‖) or "update" (‖g + βw‖, as optax).
        lr_in_momentum (bool): put the learning rate inside the momentum buffer (default False).
        exclude (callable, optional): ``exclude(param) -> bool``; excluded params skip the trust ratio and weight
            decay. Default: ``p.ndim <= 1``. Not saved in the state_dict; pass it again when resuming.
        maximize (bool): maximize the objective (default False).
        state_dtype (torch.dtype, optional): dtype of ``momentum_buffer`` (default: the param's dtype).

    State: ``momentum_buffer`` per param, as torch.optim.SGD. Works with torch.amp.GradScaler.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
        >>> opt = fastcnn.optim.LARS(model.parameters(), lr=1.0, weight_decay=1e-4)
        >>> sched = fastcnn.optim.warmup_polynomial_decay(opt, warmup_steps=5, total_steps=100)
        >>> model(torch.randn(16, 4)).sum().backward()
        >>> opt.step(); sched.step(); opt.zero_grad()
    """

    def __init__(self, params, lr, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                 trust_coefficient=0.001, eps=1e-8, trust_clip=False, trust_norm="weight", lr_in_momentum=False,
                 exclude=None, maximize=False, *, state_dtype=None):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        for name, value in (("learning rate", lr), ("momentum value", momentum), ("dampening value", dampening),
                            ("weight_decay value", weight_decay), ("trust_coefficient value", trust_coefficient),
                            ("epsilon value", eps)):
            if not 0.0 <= value:
                raise ValueError(f"Invalid {name}: {value}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if trust_norm not in _TRUST_NORMS:
            raise ValueError(f"trust_norm must be one of {_TRUST_NORMS}, got {trust_norm!r}")
        if lr_in_momentum and dampening != 0:
            raise ValueError("lr_in_momentum=True does not support dampening")
        if exclude is not None and not callable(exclude):
            raise TypeError(f"exclude must be a callable param -> bool or None, got {type(exclude).__name__}")
        self.exclude = exclude_bias_and_norm if exclude is None else exclude
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay,
                    "nesterov": nesterov, "trust_coefficient": trust_coefficient, "eps": eps,
                    "trust_clip": trust_clip, "trust_norm": trust_norm, "lr_in_momentum": lr_in_momentum,
                    "maximize": maximize}
        super().__init__(params, defaults)
        self._setup_fused(state_dtype)

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("exclude", exclude_bias_and_norm)

    def _init_state(self, group, p, state):
        pass  # the momentum buffer is made by split_first_step

    def _step_group(self, group, buckets, amp):
        momentum, dampening = scalar(group["momentum"], "momentum"), scalar(group["dampening"], "dampening")
        weight_decay = scalar(group["weight_decay"], "weight_decay")
        lr_in_momentum = group["lr_in_momentum"]
        for (device, _, _), params in buckets.items():
            lr, lr_tensor = lr_arguments(group["lr"], device)
            grad_scale, found_inf = amp.on(device)
            is_excluded = [bool(self.exclude(p)) for p in params]
            adapted = [p for p, excluded in zip(params, is_excluded) if not excluded]
            excluded = [p for p, excluded in zip(params, is_excluded) if excluded]
            buffered = momentum != 0 or lr_in_momentum
            for is_first_step, part in split_first_step(self, adapted, buffered):
                ops.lars_(part, [p.grad for p in part], self._buffers(part, buffered), lr, lr_tensor, momentum,
                          dampening, weight_decay, group["trust_coefficient"], group["eps"],
                          group["nesterov"], group["maximize"], group["trust_clip"], group["trust_norm"] == "update",
                          lr_in_momentum, is_first_step, grad_scale, found_inf)
            for is_first_step, part in split_first_step(self, excluded, momentum != 0):
                ops.sgd_(part, [p.grad for p in part], self._buffers(part, momentum != 0), lr, lr_tensor, momentum,
                         dampening, 0.0, group["nesterov"], group["maximize"], is_first_step, grad_scale, found_inf)

    def _buffers(self, params, buffered):
        return [self.state[p]["momentum_buffer"] for p in params] if buffered else []
