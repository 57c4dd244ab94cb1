"""Fused Conv2d(3x3, pad 1) + bias + ReLU + 2x2 max-pool on the VGG-16 block shapes, against stock PyTorch.

Shapes: the conv that ends each of VGG-16's five blocks (the one followed by the 2x2 max pool), C -> C channels.
Modes: "fwd" = inference forward (under torch.no_grad); "fwd+bwd" = forward + backward to input, weight and bias.
Providers: fastcnn on every backend that runs on the device (Triton never on CPU: its interpreter is not a thing to
time), stock eager (Conv2d -> ReLU(inplace=True) -> MaxPool2d as torchvision's VGG; cudnn.benchmark on GPU),
torch.compile default, and torch.compile(mode="max-autotune") on GPU only. Every provider's result is checked
against a float64 oracle in the same run (see _harness.check); a wrong result marks the row failed.

    python benchmarks/bench_conv_block.py [--device cpu|cuda] [--quick] [--sweep] [--batch N] [--out DIR]
        [--blocks block1,...] [--headline-only] [--layout contiguous|channels_last] [--no-max-autotune]
        [--wait-quiet S] [--retries N]
(benchmarks/README.md explains each option and what is measured.)
"""
import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import fastcnn  # noqa: E402

OP = "conv3x3+bias+relu+maxpool2x2"
VGG16_BLOCKS = [("block1", 64, 224), ("block2", 128, 112), ("block3", 256, 56), ("block4", 512, 28),
                ("block5", 512, 14)]
LAYOUTS = {  # (dtype, memory format) tables per device; the first is the headline table
    "cuda": [(torch.bfloat16, torch.channels_last), (torch.float32, torch.contiguous_format)],
    "cpu": [(torch.float32, torch.contiguous_format), (torch.float32, torch.channels_last)],
}
DEFAULT_BATCH = {"cuda": 64, "cpu": 2}
SWEEP = {  # batch sizes at 128 channels x sweep resolution; resolutions at 128 channels x default batch; "thin":
    # the small layers of a narrow network at the default batch, ((C_in, C_out), resolution) - on CPU the
    # stage-opening convs of the encoder-decoder's VGG-11 encoder at width 0.25 and 64^2 (bench_models.py)
    "cuda": {"batches": [1, 2, 4, 8, 16, 32, 64, 128, 256], "resolution": 112, "resolutions": [14, 28, 56, 112, 224],
             "thin": []},
    "cpu": {"batches": [1, 2, 4, 8], "resolution": 56, "resolutions": [14, 28, 56, 112],
            "thin": [((3, 16), 64), ((16, 32), 32), ((32, 64), 16), ((64, 128), 8)]},
}
CUDA_GRAPH_MAX_BATCH = 8  # sweep forwards at or below this batch are replayed from CUDA graphs (launch-bound)
MODES = ("fwd", "fwd+bwd")
LAYOUT_NAME = {torch.contiguous_format: "contiguous", torch.channels_last: "channels_last"}


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


class Case:
    """One shape x dtype x layout: the stock block, fastcnn's module sharing its parameters, inputs, and the
    float64 oracle (forward output and the three gradients)."""

    def __init__(self, block, channels, res, batch, dtype, fmt, device, pool="max"):
        torch.manual_seed(0)
        c_in, c_out = channels if isinstance(channels, tuple) else (channels, channels)
        conv = nn.Conv2d(c_in, c_out, 3, padding=1, device=device, dtype=dtype)
        self.pooled = pool == "max"  # else pool="none": Conv2d -> ReLU and fastcnn's ConvReLU2d
        layers = (conv, nn.ReLU(inplace=True)) + ((nn.MaxPool2d(2),) if self.pooled else ())
        self.stock = nn.Sequential(*layers).to(memory_format=fmt)
        fused = fastcnn.nn.ConvReLUPool2d if self.pooled else fastcnn.nn.ConvReLU2d
        self.fused = fused.from_modules(*self.stock)
        self.params = [conv.weight, conv.bias]
        self.x = torch.randn(batch, c_in, res, res, device=device, dtype=dtype).to(memory_format=fmt)
        self.x.requires_grad_()
        out_res = res // 2 if self.pooled else res
        self.grad_out = torch.randn(batch, c_out, out_res, out_res, device=device, dtype=dtype)
        self.grad_out = self.grad_out.to(memory_format=fmt)
        self.meta = {"op": OP, "block": block, "shape": {"N": batch, "C_in": c_in, "C_out": c_out,
                                                         "H": res, "W": res, "kernel": 3, "padding": 1},
                     "dtype": dtype_name(dtype), "layout": LAYOUT_NAME[fmt], "pool": pool}
        self.dtype, self.device = dtype, device
        self.reference = self._oracle(conv)

    def _oracle(self, conv):
        """Float64 forward of the same block and its gradients for ``check_grad_out``: the output gradient with
        zeros at the pool windows whose winner is ambiguous at this dtype. There a correct implementation may pick
        the other element (a tie within rounding), moving the whole gradient of the window; stock PyTorch does so
        too, at other windows. Timing uses the full ``grad_out``."""
        x = self.x.detach().double().contiguous().requires_grad_()
        w = conv.weight.detach().double().contiguous().requires_grad_()
        b = conv.bias.detach().double().requires_grad_()
        z = F.conv2d(x, w, b, padding=1)
        out = F.max_pool2d(F.relu(z), 2) if self.pooled else F.relu(z)
        with torch.no_grad():
            stock_err = (self.stock(self.x).double() - out).abs().max()
            ambiguous = self._ambiguous_windows(z, 4 * stock_err) if self.pooled else z.abs() < 4 * stock_err
        self.check_grad_out = self.grad_out.masked_fill(ambiguous, 0)
        self.meta["check_masked_windows"] = ambiguous.double().mean().item()
        out.backward(self.check_grad_out.double())
        return (out.detach(), x.grad, w.grad, b.grad)

    @staticmethod
    def _ambiguous_windows(z, tol):
        """2x2 windows of the pre-activation ``z`` where an error of ``tol`` can change the pooled element or the
        ReLU decision: the largest value above -tol and either within tol of zero or of the runner-up."""
        top = z.unfold(2, 2, 2).unfold(3, 2, 2).flatten(-2).topk(2, dim=-1).values
        return (top[..., 0] > -tol) & ((top[..., 0] < tol) | (top[..., 0] - top[..., 1] < tol))

    def work(self, mode):
        """(FLOPs, bytes) of the ideal implementation: conv FLOPs (x3 with dgrad and wgrad); bytes = input, weight,
        bias, pooled output once each (backward adds grad_out, input and weight again, grad_input, grad_weight)."""
        s, item = self.meta["shape"], self.x.element_size()
        flops = 2 * s["N"] * s["C_out"] * s["H"] * s["W"] * s["C_in"] * 9
        x_bytes, w_bytes = self.x.numel() * item, sum(p.numel() for p in self.params) * item
        out_bytes = self.grad_out.numel() * item
        fwd = x_bytes + w_bytes + out_bytes
        return (flops, fwd) if mode == "fwd" else (3 * flops, fwd + out_bytes + 2 * x_bytes + 2 * w_bytes)

    def step(self, module, mode, grad_out=None):
        """A callable running one `mode` step of `module`, returning what is checked against the oracle."""
        if mode == "fwd":
            def forward():
                with torch.no_grad():
                    return (module(self.x),)
            return forward

        def forward_backward():
            self.zero_grad()
            out = module(self.x)
            out.backward(self.grad_out if grad_out is None else grad_out)
            return (out.detach(), self.x.grad, self.params[0].grad, self.params[1].grad)
        return forward_backward

    def zero_grad(self):
        self.x.grad = None
        for p in self.params:
            p.grad = None


def providers(device, without_max_autotune):
    """[(name, factory(case, mode) -> module)], stock eager first (its error is the yardstick), and the notes on
    what was skipped and why."""
    found, notes = [("eager", lambda case, mode: case.stock)], []
    found.append(("compile", lambda case, mode: torch.compile(case.stock)))
    if device.type == "cuda" and not without_max_autotune:
        found.append(("compile-max-autotune", lambda case, mode: torch.compile(case.stock, mode="max-autotune")))
    elif device.type == "cuda":
        notes.append("torch.compile(mode='max-autotune') left out of this run (--sweep or --no-max-autotune)")
    else:
        notes.append("torch.compile(mode='max-autotune') skipped on CPU: it compiles for minutes per shape")
    for backend in fastcnn.BACKENDS:
        reason = fastcnn.ops.why_unavailable(backend, device.type)
        if backend == "triton" and device.type == "cpu":
            reason = "Triton on CPU runs only under its interpreter: correct but far too slow to benchmark"
        if reason is None:
            found.append((f"fastcnn[{backend}]", lambda case, mode, b=backend: H.WithBackend(case.fused, b)))
        else:
            notes.append(f"fastcnn[{backend}] not benchmarked on {device.type}: {reason}")
    # What a user gets: the op's route (fastcnn/ops/conv_relu_pool ROUTES), which sends measured-slower cases to stock.
    found.append(("fastcnn", lambda case, mode: case.fused))
    notes.append("fastcnn = the routed default; fastcnn[<backend>] = that backend forced")
    return found, notes


def provider_steps(case, mode, factory):
    """(module, the step whose outputs are checked, the timed step) of one provider: the check runs with the output
    gradient masked at the pool windows whose winner is ambiguous (Case._oracle), the timing with the full one."""
    module = factory(case, mode)
    return module, case.step(module, mode, case.check_grad_out), case.step(module, mode)


def measure(case, mode, factories, ceilings, timing, graphed):
    """One row: every provider checked and (fwd+bwd) its saved-tensor bytes and peak memory measured, then all of
    them timed against each other (interleaved on CPU, `H.bench_all`)."""
    flops, nbytes = case.work(mode)
    row = dict(case.meta, mode=mode, flops=flops, bytes=nbytes, cuda_graph=graphed, providers={}, ratios={})
    stock_out, timed = None, {}
    for name, factory in factories:
        result = {}
        try:
            torch._dynamo.reset()
            module, checked, run = provider_steps(case, mode, factory)
            got, checked_result = H.checked_first_call(checked, stock_out, case.reference, case.dtype, case.device)
            result.update(checked_result)
            stock_out = stock_out or got  # eager runs first
            del got
            if mode == "fwd+bwd":
                result["saved_bytes"] = H.saved_tensor_bytes(lambda: module(case.x), held=[case.x, *case.params])
                result["peak_step_bytes"] = H.peak_step_bytes(run, case.zero_grad, case.device)
            timed[name] = H.cuda_graphed(run) if graphed else run
        except Exception as exc:  # a provider that cannot run this case is recorded, not fatal
            if name == "eager":
                raise  # no yardstick, no row
            result = {"error": f"{type(exc).__name__}: {exc}"[:500], "ok": False}
        case.zero_grad()
        row["providers"][name] = result
    H.time_providers(row, timed, case.device, timing, (flops, nbytes), ceilings, case.dtype)
    case.zero_grad()
    _add_ratios(row)
    return row


def _add_ratios(row):
    """ratio = baseline time / fastcnn time (> 1: fastcnn faster; on CPU the median of the per-round paired ratios,
    with their spread: `H.set_ratios`); none for a fastcnn provider that failed its check. A baseline's check is
    recorded but does not gate it: stock PyTorch is the yardstick, not the subject."""
    fastcnn_names = [n for n in row["providers"] if n.startswith("fastcnn")]
    baselines = [n for n, r in row["providers"].items() if n not in fastcnn_names and "median_ms" in r]
    for name in fastcnn_names:
        H.set_ratios(row, name, baselines, row["providers"][name]["ok"])
    row["status"] = "ok" if all(row["providers"][n]["ok"] for n in fastcnn_names) else "failed"


def describe(row):
    s = row["shape"]
    head = f"{row['block']:>7} {s['N']}x{s['C_in']}x{s['H']}x{s['W']} {row['dtype']} {row['layout']} {row['mode']}:"
    parts = []
    for name, r in row["providers"].items():
        if "median_ms" not in r:
            parts.append(f"{name} ERROR")
            continue
        flag = "" if r["ok"] else (" WRONG" if name.startswith("fastcnn") else f" (err {r['err_vs_stock']:.1f}x eager)")
        parts.append(f"{name} {r['median_ms']:.2f}ms{flag}")
    ratios = [f"{n} " + ", ".join(f"x{v:.2f} vs {b}" for b, v in vs.items())
              for n, vs in row["ratios"].items() if None not in vs.values()]
    return f"{head} {' | '.join(parts)}\n{'':>10}{'; '.join(ratios)} [{row['status']}]"


def cases_for(args, device):
    """(sweep axis or None, Case-constructor args) for the headline suite or the sweep."""
    layouts = LAYOUTS[device.type][:1] if (args.quick or args.sweep or args.headline_only) else LAYOUTS[device.type]
    if args.layout:
        layouts = [(dtype, fmt) for dtype, fmt in LAYOUTS[device.type] if LAYOUT_NAME[fmt] == args.layout][:1]
    batch = args.batch or (1 if args.quick else DEFAULT_BATCH[device.type])
    if args.sweep:
        s = SWEEP[device.type]
        dtype, fmt = layouts[0]
        for n in s["batches"]:
            yield "batch", ("sweep", 128, s["resolution"], n, dtype, fmt)
        for res in s["resolutions"]:
            yield "resolution", ("sweep", 128, res, batch, dtype, fmt)
        for channels, res in s["thin"]:
            yield "thin", ("sweep", channels, res, batch, dtype, fmt)
        return
    blocks = [b for b in VGG16_BLOCKS if b[0] in args.blocks.split(",")] if args.blocks else VGG16_BLOCKS
    blocks = [VGG16_BLOCKS[2], VGG16_BLOCKS[4]] if args.quick else blocks
    for dtype, fmt in layouts:
        for name, channels, res in blocks:
            yield None, (name, channels, max(2, round(res * args.res_scale)), batch, dtype, fmt)


def suite_name(args):
    """conv_block[_sweep][_quick][_pool-none][_<layout>][_<blocks>]: a partial run never overwrites the full run's
    file."""
    suite = "conv_block" + ("_sweep" if args.sweep else "") + ("_quick" if args.quick else "")
    suite += "_pool-none" if args.pool == "none" else ""
    suite += "_" + args.layout if args.layout else ""
    return suite + ("_" + args.blocks.replace(",", "-") if args.blocks and not (args.sweep or args.quick) else "")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="two small shapes, one layout, batch 1: a CI smoke run")
    parser.add_argument("--sweep", action="store_true", help="scaling sweep over batch size and resolution")
    parser.add_argument("--batch", type=int, help="batch size (default: 64 on GPU, 2 on CPU)")
    parser.add_argument("--blocks", help="comma-separated subset of block1..block5 (to split a long run)")
    parser.add_argument("--headline-only", action="store_true",
                        help="only the first table (GPU: bf16 channels_last; CPU: fp32 contiguous)")
    parser.add_argument("--layout", choices=sorted(LAYOUT_NAME.values()),
                        help="only this layout's table (its first dtype); the sweep's default: the first table's")
    parser.add_argument("--no-max-autotune", action="store_true", help="leave torch.compile max-autotune out")
    parser.add_argument("--res-scale", type=float, default=1.0, help="scale every block's resolution")
    parser.add_argument("--pool", choices=["max", "none"], default="max",
                        help="none: Conv2d -> ReLU against fastcnn's ConvReLU2d (the convs a pool does not follow)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timed repeats per provider")
    parser.add_argument("--retries", type=int, help="CPU: times a series disturbed by other processes is "
                        "repeated after a pause (default 3; 0 with --quick)")
    parser.add_argument("--out", help="results folder (default: benchmarks/results)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="first wait up to S seconds for the 1-minute load average to drop below 0.5")
    args = parser.parse_args(argv)
    if args.quick:
        args.res_scale = min(args.res_scale, 0.5)
    if args.retries is None:
        args.retries = 0 if args.quick else 3
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    waited = H.wait_for_quiet(args.wait_quiet) if args.wait_quiet else 0
    env = dict(H.environment(device), waited_for_quiet_s=waited)
    ceilings = H.measure_ceilings(device, sorted({d for d, _ in LAYOUTS[device.type]}, key=str), args.retries)
    print(H.banner(env, ceilings), flush=True)
    factories, notes = providers(device, args.sweep or args.no_max_autotune)
    if args.res_scale != 1.0:
        notes.append(f"resolutions scaled by {args.res_scale} from VGG-16's")
    for note in notes:
        print("note:", note)

    rows, suite = [], suite_name(args)
    timing = {"budget_s": args.budget, "retries": args.retries}
    try:
        for sweep_axis, spec in cases_for(args, device):
            case = Case(*spec, device, pool=args.pool)
            graphed = bool(sweep_axis) and device.type == "cuda" and spec[3] <= CUDA_GRAPH_MAX_BATCH
            for mode in MODES:
                row = measure(case, mode, factories, ceilings, timing, graphed and mode == "fwd")
                rows.append(dict(row, sweep=sweep_axis) if sweep_axis else row)
                print(describe(row), flush=True)
            del case
            H.write_results(suite, env, ceilings, rows, args.out, notes, complete=False)  # survives a kill
    except BaseException as exc:
        H.write_results(suite, env, ceilings, rows, args.out, [*notes, f"aborted: {exc!r}"[:300]], complete=False)
        raise
    note = H.disturbed_note([r for row in rows for r in row["providers"].values() if "median_ms" in r])
    notes += [note] if note else []
    if any(r["cuda_graph"] for r in rows):
        notes.append(f"sweep forwards at batch <= {CUDA_GRAPH_MAX_BATCH} replay every provider from a CUDA graph")
    print(f"wrote {H.write_results(suite, env, ceilings, rows, args.out, notes)}")
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        print(f"FAILED: {r['block']} {r['dtype']} {r['layout']} {r['mode']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
