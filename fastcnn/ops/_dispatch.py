"""Which backend runs a fastcnn op, decided in this one place, and the helpers every op shares.

Backends: "cuda" (C++/CUDA kernels of fastcnn._C), "triton" (fastcnn.triton_kernels), "cpu" (C++ CPU kernels of
fastcnn._C) and "reference" (plain PyTorch - stock ATen/cuDNN/oneDNN ops - always available; spelled `STOCK` in a
route table where fastcnn's own kernel was measured slower than stock).

Every op package declares its `RouteTable` in its ``__init__.py``: ordered `Route` entries keyed by what decides the
backend (device, dtype, memory layout, mode, size class), each naming the backend that runs and where the
measurement that put it there is (``measured="benchmarks/results/<file>.json#<row>"``, or ``"unmeasured"``).
`route(table, x)` returns the backend of the first entry that matches the call and can run here, else "reference".
`FASTCNN_BACKEND=<name>` or `set_backend(name)` forces one backend for every op; forcing a backend that cannot run a
call is an error that says why, never a silent fallback.

The stale-build check is the same for every op: a table lists the fastcnn._C ops its cpu/cuda backends call
(``compiled=``); when the loaded fastcnn._C lacks one (built from older sources), the first call warns once and the
next entry runs.
"""
import contextlib
import importlib
import importlib.util
import os
import warnings
from typing import NamedTuple, Optional, Tuple

import torch

from .. import _extension

BACKENDS = ("cuda", "triton", "cpu", "reference")
STOCK = "reference"  # plain PyTorch is stock PyTorch: a route to it says "fastcnn is not faster here"
UNMEASURED = "unmeasured"
# The CPU run the CPU entries come from (one results file per suite: <CPU_RESULTS>_<suite>.json)
CPU_RESULTS = "benchmarks/results/2026-12-07_cpu-intel-r-xeon-r-processor"
NO_TRITON = "no Triton kernel for this op"


def _triton_status():
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if not hasattr(torch.library, "triton_op"):
        return False, f"torch {torch.__version__} has no torch.library.triton_op"
    return True, None


_TRITON_OK, _TRITON_WHY_NOT = _triton_status()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_forced = os.environ.get("FASTCNN_BACKEND") or None


def why_unavailable(backend, device_type):
    """None when `backend` can run on `device_type` here (whatever the op), else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return "the cpu backend runs on CPU tensors only"
        return None if _extension.LOADED else _extension.WHY_NOT_LOADED
    if backend == "cuda":
        if device_type != "cuda":
            return "the cuda backend runs on CUDA tensors only"
        if not _extension.LOADED:
            return _extension.WHY_NOT_LOADED
        return None if _extension.WITH_CUDA else "fastcnn._C was built without CUDA kernels"
    if backend == "triton":
        if not _TRITON_OK:
            return _TRITON_WHY_NOT
        if device_type == "cpu" and not TRITON_INTERPRET:
            return "Triton runs on CPU tensors only under its interpreter (TRITON_INTERPRET=1)"
        if device_type not in ("cpu", "cuda"):
            return f"Triton does not run on {device_type} tensors"
        return None
    raise ValueError(f"fastcnn: unknown backend {backend!r}; expected one of {BACKENDS}")


def set_backend(backend):
    """Forces `backend` for every fastcnn op (None restores automatic choice); returns the previous setting."""
    global _forced
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"fastcnn.set_backend: backend must be one of {BACKENDS} or None, got {backend!r}")
    previous, _forced = _forced, backend
    return previous


def forced_backend():
    """The backend forced by FASTCNN_BACKEND or set_backend, or None."""
    return _forced


@contextlib.contextmanager
def use_backend(backend):
    """Context manager form of set_backend."""
    previous = set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)


class Route(NamedTuple):
    """One entry of a route table: the calls it serves (None: any) -> the backend and where its timing is.

    Example (a measured CPU entry that sends small float32 inputs to stock PyTorch)::

        Route("reference", measured="benchmarks/results/conv_block_cpu.json#small-fp32", device="cpu",
              dtypes=(torch.float32,), size="small")
    """
    backend: str
    measured: str = UNMEASURED  # "benchmarks/results/<file>.json#<row>" or "unmeasured"
    device: Optional[str] = None  # "cpu" | "cuda"
    dtypes: Optional[Tuple[torch.dtype, ...]] = None
    layout: Optional[str] = None  # "contiguous" | "channels_last" (memory_format_of the input)
    mode: Optional[str] = None  # op-defined, e.g. "train" | "eval"
    size: Optional[str] = None  # op-defined size class (the op passes it to route())

    def matches(self, device, dtype, layout, mode, size):
        return ((self.device is None or self.device == device) and (self.dtypes is None or dtype in self.dtypes)
                and (self.layout is None or self.layout == layout) and (self.mode is None or self.mode == mode)
                and (self.size is None or self.size == size))


TABLES = {}  # op name -> RouteTable, in import order (fastcnn.info walks it)


class RouteTable:
    """How one op is routed: its ordered `Route` entries and what each backend of the op needs.

    Args:
        op: the op's name (as fastcnn.info prints it).
        routes: `Route` entries, tried in order; "reference" runs when none matches and can run.
        compiled: the fastcnn._C ops its cpu and cuda backends call; empty when the op has no C++ backend.
        triton: None when the op's Triton ops loaded, else why the triton backend cannot serve it (`load_triton`;
            `NO_TRITON` when the op has no Triton kernel at all).
        no_float64: backends whose kernels do not take float64.
        compiled_backends: which of "cpu" and "cuda" the `compiled` ops have kernels for.
    """

    def __init__(self, op, routes, *, compiled=(), triton=NO_TRITON, no_float64=(), compiled_backends=("cpu", "cuda")):
        self.op, self.routes, self.compiled = op, tuple(routes), tuple(compiled)
        self.compiled_backends = tuple(compiled_backends) if self.compiled else ()
        self.triton, self.no_float64 = triton, tuple(no_float64)
        self._warned = False
        self._chosen = {}  # (device, dtype, layout, mode, size, stock skipped) -> backend, see choose
        # Looked up once here, not per call: torch.compile cannot trace the dispatcher query.
        self._missing = {backend: [name for name in self.compiled if not _extension.has_kernel(name, backend)]
                         for backend in ("cpu", "cuda")}
        TABLES[op] = self

    def why_not(self, backend, device_type, dtype=None):
        """None when `backend` can run this op on `device_type` tensors (of `dtype`) here, else why not."""
        if backend in ("cpu", "cuda") and backend not in self.compiled_backends:
            return f"{self.op} has no {backend} backend (no {'C++' if backend == 'cpu' else 'CUDA'} kernel for this op)"
        if backend == "triton" and self.triton == NO_TRITON:
            return f"{self.op} has no triton backend ({NO_TRITON})"
        reason = why_unavailable(backend, device_type)
        if reason is not None:
            return reason
        if backend in ("cpu", "cuda"):
            reason = self.stale_build(backend)
            if reason is not None:
                return reason
        if backend == "triton" and self.triton is not None:
            return self.triton
        if dtype == torch.float64 and backend in self.no_float64:
            return f"the {backend} backend does not support float64"
        return None

    def stale_build(self, backend):
        """Why the loaded fastcnn._C cannot serve this op on `backend` although it loaded, or None."""
        missing = self._missing[backend]
        if not missing:
            return None
        return (f"fastcnn._C was built from older sources without a {backend.upper()} kernel for "
                f"fastcnn::{missing[0]}; rebuild it")

    def choose(self, x, mode=None, size=None):
        """The backend for one call on tensor `x` (of the op's `mode` and size class `size`, both op-defined): the
        forced one (checked), else the first matching entry that can run here, else "reference".

        The answer for each key of a call is remembered (a few dict entries per op): it depends only on the key, the
        table and what loaded at import - never on tensor values or module state -, and a forced backend is not
        remembered (`remembered`). This runs on every call of every fused module, so it reads each property of `x`
        once."""
        device = "cpu" if x.is_cpu else x.device.type
        if _forced is not None:
            reason = self.why_not(_forced, device, x.dtype)
            if reason is not None:
                raise RuntimeError(f"fastcnn: backend {_forced!r} was forced but cannot run {self.op} here: {reason}")
            return _forced
        return remembered(self._chosen, (device, x.dtype, layout_of(x), mode, size, _stock_routes_skipped > 0),
                           self._first_that_runs)

    def _first_that_runs(self, device, dtype, layout, mode, size, skip_stock):
        for entry in self.routes:
            if not entry.matches(device, dtype, layout, mode, size) or (skip_stock and entry.backend == STOCK):
                continue
            reason = self.why_not(entry.backend, device, dtype)
            if reason is None:
                return entry.backend
            if entry.backend in ("cpu", "cuda") and _extension.LOADED and not self._warned \
                    and self.stale_build(entry.backend) == reason:
                self._warned = True
                warnings.warn(f"fastcnn: {self.op}: {reason}; using the next backend", RuntimeWarning, stacklevel=4)
        return "reference"


def remembered(memo, key, decide):
    """``decide(*key)``, remembered in the dict `memo` (emptied when it reaches `MEMO_LIMIT` keys, should calls come
    in endlessly many signatures); worked out at each trace instead while dynamo traces, so guards stay on the key's
    inputs, not on the dict (the keys hold no shapes, so export's symbolic ones never reach the dict)."""
    if _dynamo_compiling():
        return decide(*key)
    answer = memo.get(key)
    if answer is None:
        if len(memo) >= MEMO_LIMIT:
            memo.clear()
        answer = memo[key] = decide(*key)
    return answer


MEMO_LIMIT = 4096
# Bound once: module_runs_stock runs on every call of every fused module (dynamo knows the function by identity).
_TENSOR, _dynamo_compiling = torch.Tensor, torch.compiler.is_dynamo_compiling
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)  # without it: never remembered


def module_runs_stock(module, x, extra, decide):
    """Whether fused `module` runs its stock layers on `x`: ``decide(x, extra)``, remembered in the module per call
    signature - `x`'s shape, strides, dtype and device, `extra` (what else the answer reads: a mode, a pool) and the
    route state (forced backend, skipped stock routes).

    Why per module, keyed on the input alone: a stock-routed fused module must cost no more than the stock layers it
    replaces, and with the caches evicted before each call (as between a network's layers) every Python step counts.
    Working the answer out (the op's size class, then its table: 40-70 us), or even looking it up by the full call
    signature with the weight's shape and the convolution arguments (24-37 us), made a stock-routed conv + ReLU +
    pool module 0.95-0.97x the three stock modules in forward (it saves two module calls, ~20 us); remembered this
    way, 1.00-1.02x (conv_block_sweep_channels_last.json, the thin layers).

    The module's own arguments are not in the key: a module whose weight or convolution arguments are reassigned
    keeps the route it had for that input - a question of speed only, since both of its paths compute the stock
    result (the fused one through the op, whose argument layer checks the call).

    Worked out at every call instead where a remembered answer cannot be trusted or hashed: under autocast (the op
    routes on the cast dtype), while dynamo traces (guards stay on the inputs, not on the dict) and for tensor
    subclasses (fake tensors with symbolic shapes)."""
    if type(x) is not _TENSOR or _dynamo_compiling() or _any_autocast():
        return decide(x, extra)
    key = (x.shape, x.stride(), x.dtype, x.device, extra, _forced, _stock_routes_skipped)
    memo = module.__dict__.get("_stock_route_memo")
    if memo is None:
        memo = module.__dict__["_stock_route_memo"] = {}
    answer = memo.get(key)
    if answer is None:
        if len(memo) >= MEMO_LIMIT:
            memo.clear()
        answer = memo[key] = decide(x, extra)
    return answer


MODULE_TABLES = {}  # fused module kind -> ModuleRoutes, in import order (fastcnn.info walks it)
_stock_routes_skipped = 0  # depth of skip_stock_routes(); a plain global, which torch.compile guards on


class ModuleRoutes:
    """Where a fused module as a whole is measured slower than the stock modules it replaces, so it runs those.

    A fused module (a residual or an Inception block) chains several fastcnn ops, and each op routes itself; whether
    the chain beats stock PyTorch's layer sequence is measured on the whole module (benchmarks/bench_residual.py,
    bench_inception.py). ``routes`` are `Route` entries with backend `STOCK`; `runs_stock(x, mode, size)` is True when
    one matches the call (``mode``: "train" with batch statistics, "eval" with running ones; ``size``: the module's
    size class, where it has one), and the module then runs
    its stock forward: stock's numbers, stock's speed, the same parameters and buffers. A forced backend
    (FASTCNN_BACKEND / `set_backend`) or `skip_stock_routes()` turns the entries off, so forcing a backend
    tests and times fastcnn's own path.
    """

    def __init__(self, module, routes):
        if any(entry.backend != STOCK for entry in routes):
            raise ValueError(f"fastcnn: {module}: a module route can only send the module to {STOCK!r}")
        self.module, self.routes = module, tuple(routes)
        self._chosen = {}  # (device, dtype, layout, mode, size) -> runs stock
        # Whether any entry keys on the layout: working it out costs two is_contiguous calls per call of the module.
        self._keys_layout = any(entry.layout is not None for entry in self.routes)
        MODULE_TABLES[module] = self

    def runs_stock(self, x, mode=None, size=None):
        """Whether a call on `x` in `mode` (and the module's size class `size`) runs the stock layers; remembered per
        key, as `RouteTable.choose` does."""
        if _forced is not None or _stock_routes_skipped > 0:
            return False
        layout = layout_of(x) if self._keys_layout else None
        return remembered(self._chosen, ("cpu" if x.is_cpu else x.device.type, x.dtype, layout, mode, size),
                          self._matches)

    def _matches(self, device, dtype, layout, mode, size):
        return any(entry.matches(device, dtype, layout, mode, size) for entry in self.routes)


@contextlib.contextmanager
def skip_stock_routes():
    """fastcnn's own path runs wherever it can: route tables pass over their `STOCK` entries and fused modules run
    fused where their `ModuleRoutes` would send them to their stock layers - to test or time fastcnn's kernels where
    the routes, measured for speed, would run stock PyTorch."""
    global _stock_routes_skipped
    _stock_routes_skipped += 1
    try:
        yield
    finally:
        _stock_routes_skipped -= 1


def route(table, x, mode=None, size=None):
    """The backend that runs `table`'s op on `x` (see `RouteTable.choose`)."""
    return table.choose(x, mode, size)


def load_triton(module, package):
    """``(module, None)`` with `module` (relative to `package`, the op's register_triton) imported, or ``(None,
    why not)``: Triton missing, or a kernel module that fails to import - which must not break `import fastcnn`."""
    reason = why_unavailable("triton", "cuda")
    if reason is not None:
        return None, reason
    try:
        return importlib.import_module(module, package), None
    except Exception as error:  # noqa: BLE001 (reported by fastcnn.info and by a forced triton backend)
        return None, f"the Triton kernels failed to load: {type(error).__name__}: {error}"


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``, or ``kernel`` itself when Triton's interpreter runs it: under
    TRITON_INTERPRET=1 ``triton.jit`` makes an InterpretedFunction, which torch 2.14's wrap_triton hands back as is
    and torch 2.11's rejects. Pass this as the launchers' ``wrap`` inside a triton_op."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    return torch.library.wrap_triton(kernel)


def eager_or_op(name, op, setup_context, backward, forward=None):
    """A callable running the custom op `op` (whose autograd is `setup_context` + `backward`) where torch.compile or
    export traces it, and elsewhere an autograd.Function with the same setup_context and backward around `forward`
    (default `op` itself, which then runs with grad mode off: no autograd of its own), and with grad mode off (no
    graph to record: inference, torch.no_grad) `forward` alone: the same kernels and bits, without the custom-op
    autograd layer's per-call cost in eager mode (its wrapper re-reads the schema to fill in defaults and
    redispatches: about 0.1 ms a call, a few percent of a small layer's training step)."""
    def run_forward(ctx, *inputs):
        output = (forward or op)(*inputs)
        setup_context(ctx, inputs, output)
        return output

    # Named after the op (`name`), so that autograd graphs say which op recorded a node ("fastcnn_<name>Backward").
    Function = type(f"fastcnn_{name}", (torch.autograd.Function,),
                    {"forward": staticmethod(run_forward),
                     "backward": staticmethod(lambda ctx, *grads: backward(ctx, *grads))})

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return Function.apply(*args) if torch.is_grad_enabled() else (forward or op)(*args)

    return call


_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_enabled(x):
    """Whether an autocast region is enabled for tensor `x`'s device type. Every fused module asks this on every
    call, and mostly none is: one C call answers that (where this torch has it; torch.compile guards on it)."""
    if _ANY_AUTOCAST is not None and not _ANY_AUTOCAST():
        return False
    return torch.is_autocast_enabled("cpu" if x.is_cpu else x.device.type)


def stock_routable(x):
    """Whether a fused module may ask its route about `x` before the op's argument layer: a 4-D tensor outside
    autocast (under which the op routes on the cast dtype). Anything else takes the op's path, whose checks name the
    argument."""
    return isinstance(x, torch.Tensor) and x.dim() == 4 and not autocast_enabled(x)


def autocast(*tensors):
    """Autocast as conv2d does: under an enabled autocast region, floating tensors other than float64 run in the
    autocast dtype. (Custom ops are invisible to autocast, so the cast happens here, for every backend.)"""
    if not autocast_enabled(tensors[0]):
        return tensors
    dtype = torch.get_autocast_dtype(tensors[0].device.type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def memory_format_of(x):
    """``channels_last`` when ``x`` is laid out NHWC (and not also plainly contiguous), else ``contiguous_format``.

    fastcnn's outputs follow their input's format by this rule, in every backend and in the fake kernels.
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _records(t):
    return isinstance(t, torch.Tensor) and t.requires_grad


def call_mode(input, weight, bias):
    """"train" where autograd records the call, else "infer" (a non-tensor argument records nothing: the op's
    argument layer names it) - for ops whose speed against stock differs with their backward."""
    recorded = torch.is_grad_enabled() and (_records(input) or _records(weight) or _records(bias))
    return "train" if recorded else "infer"


def layout_of(x):
    """The layout a `Route` keys on: "channels_last" or "contiguous" (as `memory_format_of`)."""
    if x.is_contiguous() or x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return "contiguous"
    return "channels_last"


def accumulation_dtype(dtype):
    """The dtype fastcnn accumulates `dtype` values in: float64 for float64, float32 for every other float."""
    return torch.float64 if dtype == torch.float64 else torch.float32
