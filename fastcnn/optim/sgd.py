"""fastcnn.optim.SGD: torch.optim.SGD (momentum, dampening, Nesterov, weight decay) as one fused op per
(device, dtype), plus the momentum-buffer bookkeeping that LARS shares."""
import torch

from ..ops import optim as ops
from ._fused import FusedOptimizer, lr_arguments, scalar


def split_first_step(optimizer, params, needs_buffer):
    """[(is_first_step, params)]: params without a momentum buffer yet get a zero one and run the first-step rule
    (buffer = update); the others continue their buffer. Without momentum (``needs_buffer`` False): one part, no
    buffers. (A first step that GradScaler skips leaves the zero buffer, so momentum then starts from zero.)"""
    if not needs_buffer:
        return [(False, params)]
    is_new = [optimizer.state[p].get("momentum_buffer") is None for p in params]
    first = [p for p, new in zip(params, is_new) if new]
    later = [p for p, new in zip(params, is_new) if not new]
    for p in first:
        optimizer.state[p]["momentum_buffer"] = optimizer._zeros_like(p)
    return [(is_first, part) for is_first, part in ((True, first), (False, later)) if part]


class SGD(FusedOptimizer, torch.optim.SGD):
    """Stochastic gradient descent with momentum, torch.optim.SGD's drop-in replacement, one fused op per param
    group and (device, dtype).

    Args:
        params (iterable): parameters or param groups, as for torch.optim.SGD.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as torch.optim.SGD (same defaults and checks);
            ``lr`` may be a 1-element tensor, which the step reads on the device.
        foreach, fused: accepted as torch.optim.SGD accepts them; they do not change the kernel.
        differentiable: must be False (fastcnn's fused steps are not differentiable).
        state_dtype (torch.dtype, optional): dtype of ``momentum_buffer`` (default: the param's dtype).

    State ``momentum_buffer`` as torch's (absent without momentum); works with torch.amp.GradScaler.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fastcnn.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(self, params, *args, state_dtype=None, **kwargs):
        self._refuse_differentiable("SGD", kwargs.get("differentiable", False))
        super().__init__(params, *args, **kwargs)
        self._setup_fused(state_dtype)

    def _init_state(self, group, p, state):
        pass  # the momentum buffer is made by split_first_step

    def _step_group(self, group, buckets, amp):
        momentum, dampening = scalar(group["momentum"], "momentum"), scalar(group["dampening"], "dampening")
        weight_decay = scalar(group["weight_decay"], "weight_decay")
        for (device, _, _), params in buckets.items():
            lr, lr_tensor = lr_arguments(group["lr"], device)
            grad_scale, found_inf = amp.on(device)
            for is_first_step, part in split_first_step(self, params, momentum != 0):
                buffers = [self.state[p]["momentum_buffer"] for p in part] if momentum != 0 else []
                ops.sgd_(part, [p.grad for p in part], buffers, lr, lr_tensor, momentum, dampening,
                         weight_decay, group["nesterov"], group["maximize"], is_first_step,
                         grad_scale, found_inf)
