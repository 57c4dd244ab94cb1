"""What the optimizer benchmark runs: the parameter sets (torchvision's ResNet-50 and VGG-16, built on the meta
device so only their shapes are read), the hyper-parameters of each optimizer, its providers (fastcnn on each
backend, torch.optim fused / foreach / single-tensor, the unfused per-parameter LARS), and the bytes each provider's
step must move at the least.
"""
import math

import torch
import torchvision

import fastcnn
from fastcnn.ops import optim as optim_ops

PARAM_SETS = {"resnet50": torchvision.models.resnet50, "vgg16": torchvision.models.vgg16}
EXPECTED_NUMEL = {"resnet50": 25_557_032, "vgg16": 138_357_544}  # shared/reference/optimizer.md
QUICK_SCALE = 1 / 8  # --quick: ResNet-50's 161 tensors, each with an eighth of its leading dimension

# Hyper-parameters of the timed step: torch's defaults, and for SGD / LARS those of ImageNet ResNet-50 training.
HYPER = {
    "Adam": dict(lr=1e-3),
    "AdamW": dict(lr=1e-3, weight_decay=1e-2),
    "SGD": dict(lr=0.1, momentum=0.9, weight_decay=1e-4),
    "Adagrad": dict(lr=1e-2),
    "LARS": dict(lr=0.1, momentum=0.9, weight_decay=5e-5),
}
OPTIMIZERS = tuple(HYPER)
FUSED_OP = {"Adam": "adam_", "AdamW": "adam_", "SGD": "sgd_", "Adagrad": "adagrad_", "LARS": "lars_"}
TORCH_VARIANTS = {"torch fused": dict(fused=True), "torch foreach": dict(foreach=True),
                  "torch single-tensor": dict(foreach=False, fused=False)}


def param_shapes(name, scale=1.0):
    """The shapes of torchvision's ``name`` model's parameters (built on the meta device: nothing is allocated),
    checked against the known total; with ``scale`` < 1 each leading dimension is scaled (at least 1)."""
    with torch.device("meta"):
        model = PARAM_SETS[name]()
    shapes = [tuple(p.shape) for p in model.parameters()]
    total = sum(math.prod(s) for s in shapes)
    if total != EXPECTED_NUMEL[name]:
        raise RuntimeError(f"{name}: torchvision's model has {total} parameters, expected {EXPECTED_NUMEL[name]}")
    if scale != 1.0:
        shapes = [(max(1, round(s[0] * scale)), *s[1:]) for s in shapes]
    return shapes


def excluded_from_lars(shape):
    """LARS's default exclusion (fastcnn.optim.exclude_bias_and_norm): biases and norm weights, ndim <= 1."""
    return len(shape) <= 1


class UnfusedLARS:
    """LARS written the usual way (as timm's ``Lars`` or torchlars): a Python loop over the parameters, per tensor
    the two norms, the trust ratio and the momentum update in plain torch ops, no host synchronisation.

    λ = η‖w‖ / (‖g‖ + β‖w‖ + ε) (1 when a norm is 0), d = λ(g + βw), b = d on the first step else μb + d,
    w = w − lr·b; tensors with ndim <= 1 skip the trust ratio and the weight decay. The same rule as
    fastcnn.optim.LARS's defaults, so the two can be compared; in float64 it is the oracle of the check.
    """

    def __init__(self, params, lr, momentum, weight_decay, trust_coefficient=0.001, eps=1e-8):
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.trust_coefficient, self.eps = trust_coefficient, eps
        self.state = {p: {} for p in self.params}

    @torch.no_grad()
    def step(self):
        for p in self.params:
            update = p.grad
            if not excluded_from_lars(p.shape):
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                trust = self.trust_coefficient * w_norm / (g_norm + self.weight_decay * w_norm + self.eps)
                trust = torch.where((w_norm > 0) & (g_norm > 0), trust, torch.ones_like(trust))
                update = p.grad.add(p, alpha=self.weight_decay).mul_(trust)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = update.clone()
            else:
                state["momentum_buffer"].mul_(self.momentum).add_(update)
            p.add_(state["momentum_buffer"], alpha=-self.lr)


class OnBackend:
    """A fastcnn optimizer whose ``step()`` runs forced onto one backend (fastcnn.use_backend)."""

    def __init__(self, optimizer, backend):
        self.optimizer, self.backend = optimizer, backend
        self.state = optimizer.state

    def step(self):
        with fastcnn.use_backend(self.backend):
            self.optimizer.step()


def fastcnn_optimizer(name, params, backend, state_dtype):
    cls = getattr(fastcnn.optim, name)
    return OnBackend(cls(params, **HYPER[name], state_dtype=state_dtype), backend)


def fastcnn_backends(name, device, dtype):
    """[(backend, None)] for each fastcnn backend that runs ``name``'s op here (the reference, plain PyTorch, is the
    oracle of the check, not a provider), and [(backend, why not)] for the others."""
    found, skipped = [], []
    for backend in fastcnn.BACKENDS:
        if backend == "reference":
            continue
        reason = optim_ops.why_unavailable(FUSED_OP[name], backend, device.type, dtype)
        if backend == "triton" and device.type == "cpu":
            reason = "Triton on CPU runs only under its interpreter: correct but far too slow to benchmark"
        (skipped if reason else found).append((backend, reason))
    return found, skipped


def providers(name, device, dtype):
    """[(provider name, role, state dtype, factory(params) -> optimizer)] for optimizer ``name`` and param dtype,
    and notes on what was skipped. Roles: "fastcnn" (timed and checked), "baseline" (its time is the numerator of
    the ratios), "sgd" (fastcnn's own SGD-momentum step, LARS's yardstick). fastcnn keeps float32 state beside
    bfloat16 params (``state_dtype=torch.float32``); torch.optim and the unfused LARS keep the params' dtype."""
    state_dtype = torch.float32 if dtype == torch.bfloat16 else None
    found, notes = [], []
    backends, skipped = fastcnn_backends(name, device, dtype)
    notes += [f"fastcnn[{b}] not benchmarked on {device.type}: {why}" for b, why in skipped]
    for backend, _ in backends:
        found.append((f"fastcnn[{backend}]", "fastcnn", state_dtype or dtype,
                      lambda ps, b=backend: fastcnn_optimizer(name, ps, b, state_dtype)))
    if name == "LARS":
        found.append(("unfused LARS", "baseline", dtype, lambda ps: UnfusedLARS(ps, **HYPER["LARS"])))
        for backend, _ in fastcnn_backends("SGD", device, dtype)[0]:
            found.append((f"fastcnn[{backend}] SGD-momentum", "sgd", state_dtype or dtype,
                          lambda ps, b=backend: OnBackend(fastcnn.optim.SGD(
                              ps, **HYPER["LARS"], state_dtype=state_dtype), b)))
        return found, notes
    for variant, flags in TORCH_VARIANTS.items():
        found.append((variant, "baseline", dtype,
                      lambda ps, flags=flags: getattr(torch.optim, name)(ps, **HYPER[name], **flags)))
    return found, notes


def check_partner(name):
    """The baseline each fastcnn provider's final params and state are checked against."""
    return "unfused LARS" if name == "LARS" else "torch fused"


def step_bytes(name, shapes, param_dtype, state_dtype, role):
    """Bytes the ideal step moves (each tensor read or written once), over all ``shapes``. Per parameter, with p/s
    the param/state element sizes (gradients have the params' dtype): Adam/AdamW 3p + 4s (read p, g, m, v; write
    p, m, v: 28 B in fp32), SGD-momentum and Adagrad 3p + 2s (20 B); LARS adds a norm pass reading p and g on the
    adapted tensors (5p + 2s = 28 B; excluded tensors 3p + 2s)."""
    p = torch.empty((), dtype=param_dtype).element_size()
    s = torch.empty((), dtype=state_dtype).element_size()
    if role == "sgd":
        name = "SGD"
    per_param = {"Adam": 3 * p + 4 * s, "AdamW": 3 * p + 4 * s, "SGD": 3 * p + 2 * s, "Adagrad": 3 * p + 2 * s}
    if name != "LARS":
        return per_param[name] * sum(math.prod(shape) for shape in shapes)
    return sum(math.prod(shape) * (3 * p + 2 * s + (0 if excluded_from_lars(shape) else 2 * p))
               for shape in shapes)


def oracle_optimizer(name, params):
    """The float64 oracle of ``name``: fastcnn's plain-PyTorch reference (run it under use_backend("reference")),
    or for LARS the unfused loop."""
    if name == "LARS":
        return UnfusedLARS(params, **HYPER["LARS"])
    return getattr(fastcnn.optim, name)(params, **HYPER[name])


def exact_order(name, device):
    """Whether fastcnn and the check partner apply the same operations in the same order, so that their tensors
    agree within OPTIM_LOCKSTEP_ULPS (tests/_tolerances.py) at any scale. So on CUDA, where torch's fused kernels
    and fastcnn's use one op order. Not so on CPU: torch's CPU kernels differ in small ways (Adam's exp_avg is a
    lerp; AdamW multiplies p by (1 − lr·wd) rounded to the param dtype), and on the benchmark's millions of
    elements under a fixed gradient the rounding differences reach past 4 ulps within ~16 steps (measured 4.1-4.3
    for Adam and Adagrad on ResNet-50/8) while both stay far inside the oracle rule; nor for LARS against the
    unfused loop (different norm reduction order). Those rows are checked against a float64 oracle."""
    return device.type == "cuda" and name != "LARS"
