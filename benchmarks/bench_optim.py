"""Optimizer step on the parameter sets of ResNet-50 and VGG-16: fastcnn's fused optimizers against torch.optim's
fused, foreach and single-tensor implementations, and fastcnn's LARS against an unfused per-parameter LARS and
against fastcnn's own SGD-momentum step.

Each case is one optimizer x parameter set x dtype: float32, or bfloat16 params (fastcnn with float32 state;
torch.optim and the unfused LARS keep bfloat16 state, and each row says which). Only ``step()`` is timed, on fixed
non-zero random gradients, after a warm-up step. Afterwards each fastcnn provider and the check partner (torch
fused; the unfused LARS for LARS) are brought to the same number of steps from the same start and compared: within
OPTIM_LOCKSTEP_ULPS of each other where the two apply the same operations in the same order, otherwise both against
a float64 oracle (fastcnn's error at most twice the partner's, plus the dtype's floor), as tests/optim does. A
mismatch fails the row.

    python benchmarks/bench_optim.py [--device cpu|cuda] [--quick] [--sets resnet50,vgg16] [--optimizers Adam,...]
        [--dtypes float32,bfloat16] [--scale F] [--budget S] [--retries N] [--wait-quiet S] [--out DIR]
(benchmarks/README.md explains each option and what is measured.)
"""
import argparse
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]
import _harness as H  # noqa: E402
import _optim_cases as C  # noqa: E402

import fastcnn  # noqa: E402

from _tolerances import ERROR_FLOOR, OPTIM_LOCKSTEP_ULPS  # noqa: E402  (the suite's one tolerance table)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ORACLE_CHUNK = 1 << 24  # elementwise optimizers' float64 oracle runs on flat chunks of this many elements


class Counted:
    """An optimizer's ``step`` as a callable that counts the steps taken (the check compares equal counts)."""

    def __init__(self, optimizer, params):
        self.optimizer, self.params, self.steps = optimizer, params, 0

    def __call__(self):
        self.optimizer.step()
        self.steps += 1

    def state_tensors(self, i):
        """{key: tensor} of the i-th param's state, ``step`` left out."""
        state = self.optimizer.state[self.params[i]]
        return {k: v for k, v in state.items() if k != "step" and isinstance(v, torch.Tensor)}


def make_tensors(shapes, dtype, device, seed=0):
    """Initial params and fixed gradients: seeded random normal (never zeros), drawn in float32, cast to dtype."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda s: torch.randn(s, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    return [draw(s) for s in shapes], [draw(s) for s in shapes]


def start(factory, init, grads):
    params = [t.clone().requires_grad_() for t in init]
    for p, g in zip(params, grads):
        p.grad = g
    return Counted(factory(params), params)


# -------------------------------------------------------------------------------------------------- the check

def _max_abs(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def lockstep_check(ours, stock):
    """Every param and state tensor within OPTIM_LOCKSTEP_ULPS units of eps(dtype) * max(1, max|stock's|)."""
    worst_ulps, worst_abs = 0.0, 0.0
    for i, (a, b) in enumerate(zip(ours.params, stock.params)):
        pairs = [(a.detach(), b.detach())] + [(t, stock.state_tensors(i)[k]) for k, t in ours.state_tensors(i).items()]
        for x, y in pairs:
            err = _max_abs(x, y)
            unit = torch.finfo(y.dtype).eps * max(1.0, y.abs().max().item())
            worst_ulps, worst_abs = max(worst_ulps, err / unit), max(worst_abs, err)
    return {"check": "lockstep", "max_abs_err": worst_abs, "max_ulps": worst_ulps,
            "tolerance_ulps": OPTIM_LOCKSTEP_ULPS, "ok": worst_ulps <= OPTIM_LOCKSTEP_ULPS}


def _oracle_pieces(name, p0, g, steps):
    """[(slice of the flat tensor, {key: float64 oracle})] after ``steps`` steps from p0 with gradient g. LARS needs
    whole tensors (norms); the elementwise optimizers run on flat chunks to bound the memory."""
    whole = name == "LARS" or p0.numel() <= ORACLE_CHUNK
    bounds = [(0, p0.numel())] if whole else [(s, min(s + ORACLE_CHUNK, p0.numel()))
                                              for s in range(0, p0.numel(), ORACLE_CHUNK)]
    for lo, hi in bounds:
        ref = (p0 if whole else p0.reshape(-1)[lo:hi]).double().clone().requires_grad_()
        ref.grad = (g if whole else g.reshape(-1)[lo:hi]).double()
        opt = C.oracle_optimizer(name, [ref])
        with fastcnn.use_backend("reference"):
            for _ in range(steps):
                opt.step()
        state = {k: v for k, v in opt.state[ref].items() if k != "step"}
        yield slice(lo, hi), dict(state, param=ref.detach())


def oracle_check(name, ours, stock, init, grads):
    """Both against a float64 oracle: fastcnn's max error at most 2x the partner's plus ERROR_FLOOR[dtype] *
    max(1, max|oracle|), for every param and state tensor (flash-attention's rule, as tests/_tolerances.py)."""
    worst, worst_abs = 0.0, 0.0
    for i, (p0, g) in enumerate(zip(init, grads)):
        mine = dict(ours.state_tensors(i), param=ours.params[i].detach())
        theirs = dict(stock.state_tensors(i), param=stock.params[i].detach())
        for piece, oracle in _oracle_pieces(name, p0, g, ours.steps):
            for key, ref in oracle.items():
                x, y = mine[key].reshape(-1)[piece], theirs[key].reshape(-1)[piece]
                err, allowed = _max_abs(x, ref.reshape(-1)), 2 * _max_abs(y, ref.reshape(-1))
                allowed += ERROR_FLOOR[x.dtype] * max(1.0, ref.abs().max().item())
                worst, worst_abs = max(worst, err / allowed), max(worst_abs, err)
    return {"check": "float64 oracle", "max_abs_err": worst_abs, "err_over_allowed": worst, "ok": worst <= 1.0}


def check(name, ours, stock, init, grads, lockstep):
    """The check of one fastcnn provider against the partner; the two have taken the same number of steps."""
    result = lockstep_check(ours, stock) if lockstep else oracle_check(name, ours, stock, init, grads)
    same_dtypes = all(t.dtype == stock.state_tensors(0)[k].dtype for k, t in ours.state_tensors(0).items())
    if not lockstep and same_dtypes and name != "LARS":  # recorded, not gating: see _optim_cases.exact_order
        result["lockstep_ulps"] = lockstep_check(ours, stock)["max_ulps"]
    return dict(result, partner=C.check_partner(name), steps=ours.steps)


def uses_lockstep(name, dtype, device):
    """Whether ``name``'s check in ``dtype`` is the lockstep one (else both against a float64 oracle)."""
    return dtype == torch.float32 and C.exact_order(name, device)


def check_before_timing(name, factory, partner_factory, init, grads, dtype, device, steps=3):
    """One fastcnn provider checked before it is timed (the pytest-benchmark session): it and the check partner
    take ``steps`` steps from the same start and are compared as ``measure`` compares them after its timings."""
    ours, partner = start(factory, init, grads), start(partner_factory, init, grads)
    for _ in range(steps):
        ours()
        partner()
    return check(name, ours, partner, init, grads, uses_lockstep(name, dtype, device))


# ------------------------------------------------------------------------------------------------------ a row

def measure(name, set_name, shapes, dtype, device, ceilings, timing):
    """One row: every provider timed on the same start and gradients, fastcnn's providers checked, ratios."""
    init, grads = make_tensors(shapes, dtype, device)
    numel = sum(math.prod(s) for s in shapes)
    factories, notes = C.providers(name, device, dtype)
    row = {"op": "optimizer step", "optimizer": name, "param_set": set_name, "params": numel,
           "tensors": len(shapes), "dtype": str(dtype).replace("torch.", ""), "mode": "step",
           "hyper": C.HYPER[name], "notes": notes, "providers": {}, "ratios": {}, "lars_over_sgd": {}}
    partner, runs = C.check_partner(name), {}
    for provider, role, state_dtype, factory in factories:
        nbytes = C.step_bytes(name, shapes, dtype, state_dtype, role)
        result = {"role": role, "state_dtype": str(state_dtype).replace("torch.", ""), "bytes": nbytes,
                  "bytes_per_param": nbytes / numel}
        try:
            runs[provider] = start(factory, init, grads)
        except Exception as exc:  # a provider that cannot run this case is recorded, not fatal
            if provider == partner:
                raise  # nothing to check against
            result = {"role": role, "error": f"{type(exc).__name__}: {exc}"[:500], "ok": False}
        row["providers"][provider] = result
    # Timed against each other (interleaved on CPU), every provider's params and state alive at once.
    for provider, timed in H.bench_all(runs, device, **timing).items():
        result = row["providers"][provider]
        result.update(timed)
        result["gbps"] = result["bytes"] / (result["median_ms"] * 1e-3) / 1e9
        result["copy_fraction"] = result["gbps"] / ceilings["copy_gbps"]
    kept = {provider: run for provider, run in runs.items()
            if row["providers"][provider]["role"] == "fastcnn" or provider == partner}
    steps = max(run.steps for run in kept.values())
    for run in kept.values():
        while run.steps < steps:
            run()
    lockstep = uses_lockstep(name, dtype, device)
    for provider, run in kept.items():
        if provider != partner:
            row["providers"][provider].update(check(name, run, kept[partner], init, grads, lockstep))
    _add_ratios(row)
    row["targets"] = targets(row, device)
    return row


def _add_ratios(row):
    """ratios[fastcnn provider][baseline] = baseline time / fastcnn time (> 1: fastcnn faster), and for LARS
    lars_over_sgd[provider] = LARS time / the same backend's SGD-momentum time; on CPU each the median of the
    per-round paired ratios (`H.paired_ratio`; the ratios' spread in ratio_spread: `H.set_ratios`); none for a
    failed check."""
    results = row["providers"]
    fastcnn_names = [n for n, r in results.items() if r["role"] == "fastcnn"]
    baselines = [n for n, r in results.items() if r["role"] == "baseline" and "median_ms" in r]
    for name in fastcnn_names:
        r = results[name]
        passed = r.get("ok", False) and "median_ms" in r
        H.set_ratios(row, name, baselines, passed)
        sgd = results.get(f"{name} SGD-momentum", {})
        if row["optimizer"] == "LARS" and "median_ms" in sgd:
            row["lars_over_sgd"][name] = H.paired_ratio(r, sgd)[0] if passed else None
    row["status"] = "ok" if all(results[n].get("ok") for n in fastcnn_names) and fastcnn_names else "failed"


def best_fastcnn(row):
    """The fastest fastcnn provider that passed its check, or None."""
    passed = [n for n, r in row["providers"].items() if r["role"] == "fastcnn" and r.get("ok") and "median_ms" in r]
    return min(passed, key=lambda n: row["providers"][n]["median_ms"], default=None)


def targets(row, device):
    """The targets of shared/BENCHMARKS.md that apply to this row, judged on the best fastcnn provider:
    [{what, value, goal, at_least, met}]. GPU (H100): Adam/AdamW fp32 >= 1.2x torch fused and >= 85% of the copy
    bandwidth; LARS >= 30x the unfused LARS and <= 1.25x fastcnn's SGD-momentum step. CPU: Adam fp32 >= 1.0x
    torch fused."""
    best, name = best_fastcnn(row), row["optimizer"]
    if best is None or row["dtype"] != "float32":
        return []
    found = []

    def add(what, value, goal, at_least=True):
        met = value is not None and (value >= goal if at_least else value <= goal)
        found.append({"what": what, "value": value, "goal": goal, "at_least": at_least, "met": met})

    ratios = row["ratios"][best]
    if name in ("Adam", "AdamW") and "torch fused" in ratios:
        add("× torch fused", ratios["torch fused"], 1.2 if device.type == "cuda" else 1.0)
        if device.type == "cuda":
            add("of copy bandwidth", row["providers"][best]["copy_fraction"], 0.85)
    if name == "LARS" and device.type == "cuda":
        add("× unfused LARS", ratios.get("unfused LARS"), 30.0)
        add("LARS / SGD-momentum time", row["lars_over_sgd"].get(best), 1.25, at_least=False)
    return found


def describe(row):
    head = f"{row['optimizer']:>7} {row['param_set']} ({row['params'] / 1e6:.2f}M) {row['dtype']}:"
    parts = []
    for name, r in row["providers"].items():
        if "median_ms" not in r:
            parts.append(f"{name} ERROR")
            continue
        flag = "" if r.get("ok", True) else " WRONG"
        parts.append(f"{name} {r['median_ms']:.1f}ms {r['gbps']:.1f}GB/s{flag}")
    ratios = [f"{n} " + ", ".join(f"x{v:.2f} vs {b}" for b, v in vs.items())
              for n, vs in row["ratios"].items() if None not in vs.values()]
    ratios += [f"{n} LARS/SGD {v:.2f}" for n, v in row["lars_over_sgd"].items() if v is not None]
    met = [f"{t['what']} {'met' if t['met'] else 'NOT met'}" for t in row["targets"]]
    return f"{head} {' | '.join(parts)}\n{'':>8}{'; '.join(ratios + met)} [{row['status']}]"


# -------------------------------------------------------------------------------------------------------- CLI

def cases(args):
    """(optimizer, param set, shapes, dtype) in run order: the smaller set first, float32 before bfloat16."""
    for set_name in args.sets:
        shapes = C.param_shapes(set_name, args.scale)
        for dtype in args.dtypes:
            for name in args.optimizers:
                yield name, set_name, shapes, DTYPES[dtype]


def suite_name(args):
    """optim[_quick][_<subset>]: a partial run never overwrites the full run's file."""
    subset = [",".join(v) for v, full in ((args.sets, list(C.PARAM_SETS)), (args.optimizers, list(C.OPTIMIZERS)),
                                          (args.dtypes, list(DTYPES))) if v != full and not args.quick]
    return "optim" + ("_quick" if args.quick else "") + "".join("_" + s.replace(",", "-") for s in subset)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help=f"ResNet-50's tensors with {C.QUICK_SCALE} of each leading dimension: a CI smoke run")
    parser.add_argument("--sets", default=",".join(C.PARAM_SETS), help="comma-separated subset of resnet50,vgg16")
    parser.add_argument("--optimizers", default=",".join(C.OPTIMIZERS), help="comma-separated subset of "
                        + ",".join(C.OPTIMIZERS))
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of float32,bfloat16")
    parser.add_argument("--scale", type=float, default=1.0, help="scale every tensor's leading dimension")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timed repeats per provider")
    parser.add_argument("--min-reps", type=int, default=5, help="timed steps per provider at least")
    parser.add_argument("--max-reps", type=int, default=15, help="timed steps per provider at most (CPU)")
    parser.add_argument("--retries", type=int, help="CPU: times a series disturbed by other processes is "
                        "repeated after a pause (default 3; 0 with --quick)")
    parser.add_argument("--out", help="results folder (default: benchmarks/results)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="first wait up to S seconds for the 1-minute load average to drop below 0.5")
    args = parser.parse_args(argv)
    if args.quick:
        args.sets, args.scale = "resnet50", min(args.scale, C.QUICK_SCALE)
    if args.retries is None:
        args.retries = 0 if args.quick else 3
    for option, allowed in (("sets", C.PARAM_SETS), ("optimizers", C.OPTIMIZERS), ("dtypes", DTYPES)):
        values = getattr(args, option).split(",")
        unknown = [v for v in values if v not in allowed]
        if unknown:
            parser.error(f"--{option}: unknown {', '.join(unknown)}; expected a subset of {', '.join(allowed)}")
        setattr(args, option, [v for v in allowed if v in values])
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    waited = H.wait_for_quiet(args.wait_quiet) if args.wait_quiet else 0
    env = dict(H.environment(device), waited_for_quiet_s=waited)
    ceilings = H.measure_ceilings(device, [torch.float32], args.retries)
    print(H.banner(env, ceilings), flush=True)
    notes = ["fastcnn[reference] (plain PyTorch) is not timed: it is the float64 oracle of the check"]
    if args.scale != 1.0:
        notes.append(f"every tensor's leading dimension scaled by {args.scale} from the model's")
    rows, suite = [], suite_name(args)
    timing = {"budget_s": args.budget, "min_reps": args.min_reps, "max_reps": args.max_reps, "warmup": 1,
              "retries": args.retries}
    try:
        for name, set_name, shapes, dtype in cases(args):
            row = measure(name, set_name, shapes, dtype, device, ceilings, timing)
            notes += [n for n in row.pop("notes") if n not in notes]
            rows.append(row)
            print(describe(row), flush=True)
            H.write_results(suite, env, ceilings, rows, args.out, notes, complete=False)  # survives a kill
    except BaseException as exc:
        H.write_results(suite, env, ceilings, rows, args.out, [*notes, f"aborted: {exc!r}"[:300]], complete=False)
        raise
    note = H.disturbed_note([r for row in rows for r in row["providers"].values() if "median_ms" in r])
    notes += [note] if note else []
    print(f"wrote {H.write_results(suite, env, ceilings, rows, args.out, notes)}")
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        print(f"FAILED: {r['optimizer']} {r['param_set']} {r['dtype']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
