"""The pytest-benchmark session's cases (benchmarks/test_bench_session.py), taken from the bench_*.py scripts
themselves: each suite's cases come from the script's own case list under the script's own command line (``--quick``
included), its providers from the script's provider builder, the steps, the float64 oracle and the correctness check
from the script's Case and helpers. Nothing here lists a shape or a provider.

Each parameter is one (suite, case, mode, dtype/layout, provider); the stock and fastcnn providers of a case share a
pytest-benchmark group. Compiled providers (torch.compile, max-autotune, fastcnn+compile) are left out unless asked
for: they take minutes to compile.
"""
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402
import _optim_cases as C  # noqa: E402
import bench_conv_block  # noqa: E402
import bench_conv_bn  # noqa: E402
import bench_conv_transpose  # noqa: E402
import bench_inception  # noqa: E402
import bench_models  # noqa: E402
import bench_optim  # noqa: E402
import bench_residual  # noqa: E402


@dataclasses.dataclass
class Param:
    """One benchmark: ``spec`` is what the suite builds the case from (its script's constructor arguments)."""

    suite: str
    case: str
    mode: str
    layout: str
    provider: str
    fastcnn: bool  # a subject: checked against the oracle with an assertion, ratios computed for it
    spec: tuple
    key: tuple  # the case it runs on (one case serves every provider, and for conv_block both modes)

    @property
    def id(self):
        return f"{self.suite}-{self.case}-{self.mode}-{self.layout}-{self.provider}"

    @property
    def group(self):
        return f"{self.suite} {self.case} {self.mode} {self.layout}"


def _part(value):
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, torch.memory_format):
        return bench_conv_block.LAYOUT_NAME[value]
    if isinstance(value, tuple):  # a named shape (its name), or constructor arguments
        return value[0] if isinstance(value[0], str) else "x".join(map(str, value))
    if isinstance(value, float):
        return f"x{value:g}"
    return str(value)


def label(spec):
    """A case's name from its constructor arguments: 'layer1-256-64-14-1', 'k2s2_512->256_@28-1-x0.25'."""
    return "-".join(_part(v) for v in spec).replace(" ", "_")


def is_compiled(provider):
    return "compile" in provider


class LayerSuite:
    """A suite whose script has a Case class, ``providers`` -> [(name, factory)] with stock eager first, and
    ``provider_steps`` -> (module, checked step, timed step); the check is _harness.checked_first_call against the
    Case's float64 ``reference`` with eager's outputs as the yardstick."""

    def __init__(self, name, script, case_script=None, providers=None):
        self.name, self.script = name, script
        self.case_script = case_script or script  # where Case, LAYOUT and provider_steps live
        self._providers = providers or (lambda device: self.case_script.providers(device)[0])

    def args(self, device, quick):
        return H.layer_suite_args("", "", ["--device", device.type] + (["--quick"] if quick else []))

    def specs(self, args, device):
        """[(spec, mode)]."""
        return [(spec[:-1], spec[-1]) for spec in self.script.case_specs(args, device)]

    def layout(self, args, spec, device):
        dtype, fmt = getattr(self.script, "LAYOUT", self.case_script.LAYOUT)[device.type]
        return f"{_part(dtype)}-{_part(fmt)}"

    def providers(self, args, device):
        return self._providers(device)

    def build(self, param, device):
        args, spec = param.spec
        return self.script.Case(*spec, param.mode, device)

    def key(self, spec, mode):
        return (self.name, spec, mode)

    def steps(self, case, mode, factory):
        return self.case_script.provider_steps(case, factory)

    def case_label(self, spec):
        return label(spec)

    def work(self, case, mode):
        """(FLOPs, bytes) of the ideal implementation: the roofline's inputs."""
        return case.work()

    def params(self, device, quick, compile_too):
        args = self.args(device, quick)
        found = []
        for spec, mode in self.specs(args, device):
            for provider, _ in self.providers(args, device):
                if is_compiled(provider) and not compile_too:
                    continue
                found.append(Param(self.name, self.case_label(spec), mode, self.layout(args, spec, device), provider,
                                   provider.startswith("fastcnn"), (args, spec), self.key(spec, mode)))
        return found

    def run(self, param, case, device, stock):
        """(timed step, extra info) of ``param`` on ``case``, after its correctness check (an AssertionError for a
        fastcnn provider that fails it). ``stock(param)``: eager's checked outputs of the case, for the yardstick."""
        args, _ = param.spec
        yardstick = None if param.provider == "eager" else stock(param)
        factory = dict(self.providers(args, device))[param.provider]
        torch._dynamo.reset()
        _, checked, timed = self.steps(case, param.mode, factory)
        got, result = H.checked_first_call(checked, yardstick, case.reference, case.dtype, device)
        info = dict(_jsonable(getattr(case, "meta", {})), mode=param.mode, provider=param.provider,
                    check=result)
        if hasattr(case, "work"):
            info["flops"], info["bytes"] = self.work(case, param.mode)
        if param.fastcnn:
            assert result["ok"], f"{param.id}: fastcnn's result fails the check against the float64 oracle: {result}"
        return timed, info, got


class ConvBlockSuite(LayerSuite):
    """bench_conv_block: its own command line, both modes on one Case, factories taking the mode."""

    def args(self, device, quick):
        return self.script.parse_args(["--device", device.type] + (["--quick"] if quick else []))

    def specs(self, args, device):
        return [(spec, mode) for axis, spec in self.script.cases_for(args, device) for mode in self.script.MODES]

    def layout(self, args, spec, device):
        return f"{_part(spec[4])}-{_part(spec[5])}"

    def case_label(self, spec):
        return label(spec[:4])  # the dtype and layout are the parameter's layout

    def work(self, case, mode):
        return case.work(mode)

    def providers(self, args, device):
        return self.script.providers(device, without_max_autotune=False)[0]

    def build(self, param, device):
        args, spec = param.spec
        return self.script.Case(*spec, device)

    def key(self, spec, mode):
        return (self.name, spec)

    def steps(self, case, mode, factory):
        return self.script.provider_steps(case, mode, factory)


class ModelsSuite(LayerSuite):
    """bench_models: cases (model, mode) at the command line's sizes, providers from ``providers(compile_too)``."""

    def args(self, device, quick):
        return self.script.parse_args(["--device", device.type] + (["--quick"] if quick else []))

    def specs(self, args, device):
        return [((name,), mode) for name, mode in self.script.case_specs(args)]

    def layout(self, args, spec, device):
        return f"{_part(self.script.run_dtype(args, device))}-{'channels_last' if args.channels_last else 'nchw'}"

    def providers(self, args, device):
        return self.script.providers(compile_too=True)

    def build(self, param, device):
        args, (name,) = param.spec
        return self.script.make_case(name, param.mode, args, self.script.DEFAULTS[device.type],
                                     self.script.run_dtype(args, device), device)


class OptimSuite:
    """bench_optim: optimizer x parameter set x dtype; the fastcnn providers checked against their partner before
    timing (bench_optim.check_before_timing), the baselines timed as they are."""

    name = "optim"
    ROLE_ORDER = {"baseline": 0, "sgd": 1, "fastcnn": 2}  # baselines first: a fastcnn result's ratios need them

    def params(self, device, quick, compile_too):
        args = bench_optim.parse_args(["--device", device.type] + (["--quick"] if quick else []))
        found = []
        for name, set_name, shapes, dtype in bench_optim.cases(args):
            case = set_name + (f"-x{args.scale:g}" if args.scale != 1 else "")
            providers = sorted(C.providers(name, device, dtype)[0], key=lambda p: self.ROLE_ORDER[p[1]])
            for provider, role, _, _ in providers:
                found.append(Param(self.name, f"{name}-{case}", "step", _part(dtype), provider, role == "fastcnn",
                                   (name, tuple(shapes), dtype), (self.name, set_name, tuple(shapes), dtype)))
        return found

    def build(self, param, device):
        name, shapes, dtype = param.spec
        return bench_optim.make_tensors(shapes, dtype, device)

    def run(self, param, tensors, device, stock):
        name, shapes, dtype = param.spec
        init, grads = tensors
        providers = {p: (role, state_dtype, f) for p, role, state_dtype, f in C.providers(name, device, dtype)[0]}
        role, state_dtype, factory = providers[param.provider]
        info = {"optimizer": name, "dtype": _part(dtype), "provider": param.provider, "role": role,
                "state_dtype": _part(state_dtype), "params": sum(t.numel() for t in init),
                "bytes": C.step_bytes(name, shapes, dtype, state_dtype, role)}
        if param.fastcnn:
            partner = providers[C.check_partner(name)][2]
            result = bench_optim.check_before_timing(name, factory, partner, init, grads, dtype, device)
            info["check"] = result
            assert result["ok"], f"{param.id}: fastcnn's step fails the check against {result['partner']}: {result}"
        return bench_optim.start(factory, init, grads), info, None


SUITES = {
    "conv_block": ConvBlockSuite("conv_block", bench_conv_block),
    "conv_bn": LayerSuite("conv_bn", bench_conv_bn, bench_residual, lambda device: bench_conv_bn.providers(device)[0]),
    "residual": LayerSuite("residual", bench_residual),
    "inception": LayerSuite("inception", bench_inception, bench_residual),
    "conv_transpose": LayerSuite("conv_transpose", bench_conv_transpose),
    "models": ModelsSuite("models", bench_models),
    "optim": OptimSuite(),
}


def session_params(device, quick=False, compile_too=False, suites=None):
    """Every benchmark of the session on ``device``, suite by suite, case by case, stock providers first."""
    return [p for name in (suites or SUITES) for p in SUITES[name].params(device, quick, compile_too)]


class Session:
    """The session's state: the case being measured (built once for all its providers, then dropped), eager's
    checked outputs on it (the check's yardstick), and each group's medians (for the ratios)."""

    def __init__(self, device):
        self.device, self.key, self.case, self.stock_outputs, self.medians = device, None, None, {}, {}
        self.ratios = []  # (group, fastcnn provider, {baseline: ratio}) in run order

    def run(self, param):
        """(timed step, extra info) of ``param``, its case built if it is not the current one, checked first."""
        if param.key != self.key:
            self.key, self.case, self.stock_outputs = None, None, {}  # the previous case goes first
            self.case, self.key = SUITES[param.suite].build(param, self.device), param.key
        timed, info, got = SUITES[param.suite].run(param, self.case, self.device, self.stock)
        if param.provider == "eager":
            self.stock_outputs[param.mode] = got
        return timed, info

    def stock(self, param):
        """Eager's checked outputs of ``param``'s case and mode (run now if eager's benchmark was deselected)."""
        if param.mode not in self.stock_outputs:
            eager = dataclasses.replace(param, provider="eager", fastcnn=False)
            self.stock_outputs[param.mode] = SUITES[param.suite].run(eager, self.case, self.device, self.stock)[2]
        return self.stock_outputs[param.mode]

    def record(self, param, median_s):
        """Stores a median; for a fastcnn provider returns {baseline: baseline median / its median} over the
        baselines of its group measured so far in this session."""
        group = self.medians.setdefault(param.group, {})
        group[param.provider] = (param.fastcnn, median_s)
        if not param.fastcnn:
            return {}
        return {name: m / median_s for name, (ours, m) in group.items() if not ours}


def _jsonable(meta):
    return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool, dict, list, type(None)))}
