"""fastcnn.optim.Adagrad: torch.optim.Adagrad as one fused op per (device, dtype)."""
import torch

from ..ops import optim as ops
from ._fused import FusedOptimizer, lr_arguments, scalar


class Adagrad(FusedOptimizer, torch.optim.Adagrad):
    """Adagrad (Duchi et al.), torch.optim.Adagrad's drop-in replacement, one fused op per param group and
    (device, dtype).

    Args:
        params (iterable): parameters or param groups, as for torch.optim.Adagrad.
        lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize: as torch.optim.Adagrad (same defaults
            and checks); ``lr`` may be a 1-element tensor, which the step reads on the device.
        foreach, fused: accepted as torch.optim.Adagrad accepts them; they do not change the kernel.
        differentiable: must be False (fastcnn's fused steps are not differentiable).
        state_dtype (torch.dtype, optional): dtype of ``sum`` (default: the param's dtype).

    State ``step`` (float32, on the param's device) and ``sum``, created at construction as torch does.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fastcnn.optim.Adagrad(model.parameters(), lr=0.01, lr_decay=1e-4)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(self, params, *args, state_dtype=None, **kwargs):
        self._refuse_differentiable("Adagrad", kwargs.get("differentiable", False))
        super().__init__(params, *args, **kwargs)
        self._setup_fused(state_dtype)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                self._placed_step(p, state)
                if state_dtype is not None:
                    state["sum"] = state["sum"].to(state_dtype)

    def _init_state(self, group, p, state):
        if len(state) == 0:  # a param added with add_param_group: torch initialises it lazily, from the defaults
            state["step"] = self._zero_step(p)
            state["sum"] = self._zeros_like(p).fill_(self.defaults["initial_accumulator_value"])

    def _step_group(self, group, buckets, amp):
        lr_decay, weight_decay = scalar(group["lr_decay"], "lr_decay"), scalar(group["weight_decay"], "weight_decay")
        for (device, _, _), params in buckets.items():
            states = [self.state[p] for p in params]
            lr, lr_tensor = lr_arguments(group["lr"], device)
            grad_scale, found_inf = amp.on(device)
            ops.adagrad_(params, [p.grad for p in params], [s["sum"] for s in states], [s["step"] for s in states],
                         lr, lr_tensor, lr_decay, weight_decay, group["eps"],
                         group["maximize"], grad_scale, found_inf)
