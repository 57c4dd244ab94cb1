"""fastcnn.optim.Adam and AdamW: torch.optim.Adam/AdamW with the whole step in one fused op per (device, dtype)."""
import torch

from ..ops import optim as ops
from ._fused import FusedOptimizer, lr_arguments, scalar


class _AdamStep(FusedOptimizer):
    """The step shared by Adam and AdamW (they differ only in torch's default ``decoupled_weight_decay``)."""

    _always_decoupled = False  # AdamW: True whatever the group says (older torch's AdamW has no such group key)

    def _init_state(self, group, p, state):
        if len(state) == 0:
            state["step"] = self._zero_step(p)
            state["exp_avg"] = self._zeros_like(p)
            state["exp_avg_sq"] = self._zeros_like(p)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = self._zeros_like(p)

    def _step_group(self, group, buckets, amp):
        beta1, beta2 = (scalar(b, "betas") for b in group["betas"])
        weight_decay = scalar(group["weight_decay"], "weight_decay")
        amsgrad = group["amsgrad"]
        decoupled = self._always_decoupled or group.get("decoupled_weight_decay", False)
        for (device, _, _), params in buckets.items():
            states = [self.state[p] for p in params]
            lr, lr_tensor = lr_arguments(group["lr"], device)
            grad_scale, found_inf = amp.on(device)
            ops.adam_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                      [s["exp_avg_sq"] for s in states], [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
                      [s["step"] for s in states], lr, lr_tensor, beta1, beta2, weight_decay,
                      group["eps"], amsgrad, group["maximize"], decoupled,
                      grad_scale, found_inf)


_ARGS = """
    Args:
        params (iterable): parameters or param groups, as for torch.optim.{name}.
        lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay: as torch.optim.{name} (same
            defaults and checks); ``lr`` may be a 1-element tensor, which the step reads on the device.
        foreach, fused, capturable: accepted as torch.optim.{name} accepts them; they do not change the kernel
            (the step is always fused and keeps ``step`` on the param's device, so it is CUDA-graph capturable).
        differentiable: must be False (fastcnn's fused steps are not differentiable).
        state_dtype (torch.dtype, optional): dtype of exp_avg/exp_avg_sq/max_exp_avg_sq; default the param's dtype,
            as torch. ``torch.float32`` keeps full-precision moments beside bfloat16/float16 params.

    The state (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) and param_groups have torch's layout: a
    state_dict of torch.optim.{name} loads here and the other way round. Works with torch.amp.GradScaler, which
    hands its scale and inf flag to the kernel (unscale in the kernel; the whole step, ``step`` included, is skipped
    when a gradient is not finite).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fastcnn.optim.{name}(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step(); opt.zero_grad()
"""


class Adam(_AdamStep, torch.optim.Adam):
    __doc__ = "Adam (Kingma & Ba), torch.optim.Adam's drop-in replacement, one fused op per (device, dtype).\n" + \
        _ARGS.format(name="Adam")

    def __init__(self, params, *args, state_dtype=None, **kwargs):
        self._refuse_differentiable("Adam", kwargs.get("differentiable", False))
        super().__init__(params, *args, **kwargs)
        self._setup_fused(state_dtype)


class AdamW(_AdamStep, torch.optim.AdamW):
    __doc__ = "AdamW (Loshchilov & Hutter), torch.optim.AdamW's drop-in replacement, one fused op per (device, " \
        "dtype).\n" + _ARGS.format(name="AdamW")
    _always_decoupled = True

    def __init__(self, params, *args, state_dtype=None, **kwargs):
        self._refuse_differentiable("AdamW", kwargs.get("differentiable", False))
        super().__init__(params, *args, **kwargs)
        self._setup_fused(state_dtype)
