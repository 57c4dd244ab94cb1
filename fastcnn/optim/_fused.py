"""What every fastcnn optimizer shares: input checks, lazy state, grouping of a param group's tensors per
(device, dtype), GradScaler plumbing, and state_dict loading that keeps ``step`` where the fused kernels want it.

An optimizer class mixes ``FusedOptimizer`` in front of its torch.optim base (``class Adam(FusedOptimizer,
torch.optim.Adam)``) and implements ``_init_state(group, param, state)`` and ``_step_group(group, buckets, amp)``.
"""
import itertools

import torch

_STEP_DTYPE = torch.float32  # torch.optim's fused/capturable paths keep `step` as a float32 0-dim device tensor


def _capturing():
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def scalar(value, name="a hyper-parameter"):
    """A Python float of an optimizer hyper-parameter that may be a 1-element tensor (betas, weight decay, ...).

    Reading a tensor is a host synchronisation, which a CUDA-graph capture cannot record: during a capture a tensor
    hyper-parameter is refused with a clear error instead of breaking the capture (only lr may be a tensor there)."""
    if not isinstance(value, torch.Tensor):
        return value
    if _capturing():
        raise RuntimeError(f"fastcnn.optim: {name} is a tensor, which a CUDA-graph capture cannot read on the host; "
                           "give it as a Python float (only lr may be a tensor during a capture)")
    return value.item()


def lr_arguments(lr, device):
    """The ops' ``(lr, lr_tensor)`` pair: a tensor lr travels as a 0-dim float32 tensor on ``device`` (no host
    read, so the step stays sync-free and capturable); a float travels as itself. A float32 lr already on ``device``
    is passed as a view (no copy); any other tensor lr is copied, which a CUDA-graph capture cannot record, so during
    a capture it is refused with a clear error."""
    if not isinstance(lr, torch.Tensor):
        return float(lr), None
    lr = lr.detach().reshape(())
    if lr.device == torch.device(device) and lr.dtype == torch.float32:
        return 0.0, lr
    if _capturing():
        raise RuntimeError(f"fastcnn.optim: lr is a {lr.dtype} tensor on {lr.device}; for a CUDA-graph capture give "
                           f"it as a float32 tensor on {device}, where the step reads it without a copy")
    return 0.0, lr.to(device=device, dtype=torch.float32)


class AmpArguments:
    """``grad_scale`` and ``found_inf`` as torch.amp.GradScaler sets them on an optimizer with
    ``_step_supports_amp_scaling`` (one tensor each, on the scaler's device), copied once per device as
    torch.optim's fused optimizers do (non-blocking, so no host synchronisation)."""

    def __init__(self, optimizer):
        self.grad_scale = getattr(optimizer, "grad_scale", None)
        self.found_inf = getattr(optimizer, "found_inf", None)
        self._per_device = {}

    def on(self, device):
        """(grad_scale, found_inf) on ``device``; None for either that is not set."""
        if device not in self._per_device:
            self._per_device[device] = tuple(
                None if t is None else t.to(device=device, dtype=torch.float32, non_blocking=True)
                for t in (self.grad_scale, self.found_inf))
        return self._per_device[device]


class FusedOptimizer:
    """Mixin of the fastcnn optimizers (see the module docstring)."""

    _step_supports_amp_scaling = True
    _state_dtype = None

    def _setup_fused(self, state_dtype):
        if state_dtype is not None and (not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point
                                        or state_dtype.is_complex):
            raise ValueError(f"{type(self).__name__}: state_dtype must be a floating-point torch.dtype or None, "
                             f"got {state_dtype!r}")
        self._state_dtype = state_dtype

    @staticmethod
    def _refuse_differentiable(name, differentiable):
        if differentiable:
            raise RuntimeError(f"fastcnn.optim.{name}: differentiable=True is not supported: fastcnn's fused "
                               f"optimizer steps are not differentiable; use torch.optim.{name}(differentiable=True)")

    def add_param_group(self, param_group):
        """torch.optim.Optimizer.add_param_group, plus fastcnn's checks: real floating-point parameters, all on
        one device within the group."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        name = type(self).__name__
        devices = []
        for p in group["params"]:
            if p.is_complex():
                raise RuntimeError(f"fastcnn.optim.{name} does not support complex parameters (got {p.dtype}); "
                                   f"use torch.optim.{name} or view them as real")
            if not p.is_floating_point():
                raise RuntimeError(f"fastcnn.optim.{name} requires floating-point parameters, got {p.dtype}")
            if p.device not in devices:
                devices.append(p.device)
        if len(devices) > 1:
            raise RuntimeError(f"fastcnn.optim.{name}: all parameters of a param group must be on one device, got "
                               f"{', '.join(str(d) for d in devices)}; put them in separate param groups")
        self._refuse_differentiable(name, group.get("differentiable", False))

    # --- state ------------------------------------------------------------------------------------------------------
    def _zeros_like(self, p):
        """A zero state tensor for ``p``: its shape and strides, dtype ``state_dtype`` (default: p's dtype)."""
        return torch.zeros_like(p, dtype=self._state_dtype or p.dtype, memory_format=torch.preserve_format)

    @staticmethod
    def _zero_step(p):
        return torch.zeros((), dtype=_STEP_DTYPE, device=p.device)

    @staticmethod
    def _placed_step(p, state):
        """state['step'] as a float32 0-dim tensor on p's device (torch's default optimizers keep it on the CPU)."""
        step = state["step"]
        if not isinstance(step, torch.Tensor):
            step = torch.tensor(float(step), dtype=_STEP_DTYPE, device=p.device)
        elif step.device != p.device or step.dtype != _STEP_DTYPE or step.dim() != 0:
            step = step.detach().reshape(()).to(device=p.device, dtype=_STEP_DTYPE)
        state["step"] = step
        return step

    def _buckets(self, group):
        """The group's params that have gradients, state initialised, as {(device, dtype, state dtype): [params]}."""
        name = type(self).__name__
        buckets = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"fastcnn.optim.{name} does not support sparse gradients")
            state = self.state[p]
            self._init_state(group, p, state)
            if "step" in state:
                self._placed_step(p, state)
            state_dtype = next((v.dtype for k, v in state.items()
                                if k != "step" and isinstance(v, torch.Tensor)), p.dtype)
            buckets.setdefault((p.device, p.dtype, state_dtype), []).append(p)
        return buckets

    def _init_state(self, group, p, state):
        raise NotImplementedError

    def _step_group(self, group, buckets, amp):
        raise NotImplementedError

    # --- the step ---------------------------------------------------------------------------------------------------
    def step(self, closure=None):
        """Performs one optimization step: one fused op per param group and (device, dtype).

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        amp = AmpArguments(self)
        with torch.no_grad():
            for group in self.param_groups:
                self._refuse_differentiable(type(self).__name__, group.get("differentiable", False))
                buckets = self._buckets(group)
                if buckets:
                    self._step_group(group, buckets, amp)
        return loss

    # --- state_dict -------------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict):
        """torch.optim.Optimizer.load_state_dict (a state_dict of the matching torch.optim optimizer loads too),
        then ``step`` goes to each param's device as float32 and, with ``state_dtype``, the state tensors are
        taken from ``state_dict`` in that dtype (torch's loader casts them to the param dtype first)."""
        super().load_state_dict(state_dict)
        saved_ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            if p not in self.state:
                continue
            state = self.state[p]
            if "step" in state:
                self._placed_step(p, state)
            saved = state_dict["state"].get(saved_id, {})
            if self._state_dtype is not None:
                for key, value in saved.items():
                    if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point():
                        state[key] = value.to(device=p.device, dtype=self._state_dtype, copy=True)
