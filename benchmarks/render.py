"""Renders every benchmarks/results/*.json into benchmarks/RESULTS.md (tables, CPU and GPU runs labelled, targets
from shared/BENCHMARKS.md beside the measured ratios) and PNG charts of the ratios in benchmarks/charts/.

    python benchmarks/render.py [--results DIR] [--out FILE] [--charts DIR]

Charts need matplotlib; without it the tables are still written and RESULTS.md says the charts were skipped.
"""
import argparse
import glob
import json
import os

from _charts import grouped_bars, markdown_row, save
from _render_optim import render_optim

HERE = os.path.dirname(os.path.abspath(__file__))
# Targets from shared/BENCHMARKS.md, per (suite, device type): {mode: {baseline: minimum ratio}}, and the table
# (dtype, layout) they apply to (None: every table). "roofline" is the minimum fraction of the roofline bound.
TARGETS = {
    ("conv_block", "cuda"): {"applies_to": ("bfloat16", "channels_last"), "roofline": 0.75,
                             "fwd": {"eager": 2.5, "compile": 1.4, "compile-max-autotune": 1.4},
                             "fwd+bwd": {"eager": 2.0, "compile": 1.4, "compile-max-autotune": 1.4}},
    ("conv_block", "cpu"): {"applies_to": None, "fwd": {"eager": 1.2}, "fwd+bwd": {"eager": 1.2}},
}
MIB = 2**20
BUSY_CORES = 0.25  # as _timing.BUSY_CORES: a CPU timing during which other processes used more is marked ‡


def targets_for(data, dtype, layout):
    suite = data["suite"].replace("_sweep", "").replace("_quick", "")
    t = TARGETS.get((suite, data["environment"]["device_type"]))
    if t is None or (t["applies_to"] is not None and t["applies_to"] != (dtype, layout)):
        return None
    return t


def shown_fastcnn(row):
    """The fastcnn provider a row's ratios are shown for: the routed default ``fastcnn`` where the row has it (what a
    user gets: stock where the route measured fastcnn slower), else the fastest of fastcnn's own backends (not
    fastcnn[reference], which is plain PyTorch) whose result passed its check; None when none passed."""
    routed = row["providers"].get("fastcnn")
    if routed is not None:
        return "fastcnn" if routed.get("ok") and "median_ms" in routed else None
    passing = [n for n, r in row["providers"].items()
               if n.startswith("fastcnn") and n != "fastcnn[reference]" and r.get("ok") and "median_ms" in r]
    return min(passing, key=lambda n: row["providers"][n]["median_ms"], default=None)


def device_label(env):
    return f"{'GPU' if env['device_type'] == 'cuda' else 'CPU'}: {env['device_name']}"


def fmt_ms(name, r):
    """Median (20%–80%); a fastcnn result that failed its check is marked wrong, a baseline's error is shown."""
    if "median_ms" not in r:
        return "error"
    flag = ""
    if not r.get("ok"):
        flag = " (wrong)" if name.startswith("fastcnn") else f" (error {r['err_vs_stock']:.1f}× eager's)"
    if r.get("other_cpu", 0) > BUSY_CORES:
        flag += " ‡"
    return f"{r['median_ms']:.2f} ({r['p20_ms']:.2f}–{r['p80_ms']:.2f}){flag}"


def fmt_ratio(value, target):
    if value is None:
        return "—"
    if target is None:
        return f"{value:.2f}×"
    return f"{value:.2f}× {'✓' if value >= target else '✗'} (≥{target})"


def fmt_memory(row, shown):
    saved = {n: r.get("saved_bytes") for n, r in row["providers"].items() if r.get("saved_bytes")}
    if shown not in saved or "eager" not in saved:
        return "", ""
    mine, stock = saved[shown]["activations"], saved["eager"]["activations"]
    text = f"{mine / MIB:.2f} / {stock / MIB:.2f} ({100 * (mine / stock - 1):+.0f}%)" if stock else ""
    peaks = {n: r.get("peak_step_bytes") for n, r in row["providers"].items()}
    peak = f"{peaks[shown] / MIB:.0f} / {peaks['eager'] / MIB:.0f}" if peaks.get(shown) and peaks.get("eager") else ""
    return text, peak


def size_label(row):
    s = row["shape"]
    channels = s["C_in"] if s.get("C_out", s["C_in"]) == s["C_in"] else f"{s['C_in']}→{s['C_out']}"
    return f"{s['N']}×{channels}×{s['H']}×{s['W']}"


def table(data, rows):
    """Markdown table of one (dtype, layout) group."""
    providers = list(rows[0]["providers"])
    baselines = [p for p in providers if not p.startswith("fastcnn")]
    target = targets_for(data, rows[0]["dtype"], rows[0]["layout"])
    head = ["case", "input N×C×H×W", "mode"] + [f"{p} ms" for p in providers] + ["fastcnn shown"] + \
        [f"× {b}" for b in baselines] + ["roofline", "rel. err", "saved activations MiB (fastcnn / eager)",
                                         "peak step MiB (fastcnn / eager)"]
    lines = [markdown_row(head), "|" + "---|" * len(head)]
    for row in rows:
        shown = shown_fastcnn(row)
        r = row["providers"].get(shown, {})
        cells = [row.get("sweep", row["block"]), size_label(row), row["mode"]]
        cells += [fmt_ms(p, row["providers"][p]) for p in providers]
        cells.append(shown or "none passed")
        for b in baselines:
            goal = target[row["mode"]].get(b) if target else None
            cells.append(fmt_ratio(row["ratios"][shown].get(b) if shown else None, goal))
        roof = f"{100 * r['roofline']:.0f}%" if shown else "—"
        if shown and target and "roofline" in target:
            roof += f" {'✓' if r['roofline'] >= target['roofline'] else '✗'} (≥{100 * target['roofline']:.0f}%)"
        cells += [roof, f"{r['rel_rms_err']:.1e}" if shown else "—", *fmt_memory(row, shown)]
        lines.append(markdown_row(cells))
    errors = sorted({f"- {p}: {r['error']}" for row in rows for p, r in row["providers"].items() if "error" in r})
    return lines + ([""] + ["Errors (the rows show `error`):"] + errors if errors else [])


def groups(rows):
    """Rows grouped by (dtype, layout), in the order they first appear."""
    out = {}
    for row in rows:
        out.setdefault((row["dtype"], row["layout"]), []).append(row)
    return out


def header(data, path):
    env, c = data["environment"], data["ceilings"]
    lines = [f"## {device_label(env)} — `{data['suite']}` ({os.path.basename(path)})", "",
             f"- torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, driver {env['driver']}; "
             f"fastcnn {env['fastcnn']} at `{env['fastcnn_commit']}`",
             f"- {env['cpu_model']}, {env['cpu_threads']} threads; 1-min load average "
             f"{env['load_average_start'][0]:.2f} at start, {env['load_average_end'][0]:.2f} at end; "
             f"started {env['started']}; command `{env['command']}`",
             f"- ceilings measured in the run: copy {c['copy_gbps']:.1f} GB/s, matmul " +
             ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in c["matmul_tflops"].items())]
    lines += [f"- note: {n}" for n in data["notes"]]
    if not data.get("complete", True):
        lines.append("- **incomplete run**: killed or aborted before the end; only the rows below were measured.")
    if env["device_type"] == "cpu":
        lines.append("- CPU result: recorded for the CPU target only; the GPU targets are judged on GPU runs.")
    return lines + [""]


def render_file(path, charts_dir, plt):
    """The markdown of one result file (and its chart): the common header, then the suite's own part."""
    with open(path) as f:
        data = json.load(f)
    chart = os.path.join(charts_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
    if data["suite"].startswith("optim"):
        body = render_optim(data, chart, plt, device_label(data["environment"]), BUSY_CORES)
    elif data["suite"].startswith("conv_block"):
        body = render_conv_block(data, chart, plt)
    else:
        body = render_generic(data["rows"])
    return header(data, path) + body


def render_generic(rows):
    """A suite without a part of its own here: one table line per row, its scalar fields (the case), every
    provider's median, the ratios and the status."""
    if not rows:
        return []
    keys = [k for k, v in rows[0].items() if not isinstance(v, (dict, list)) and k != "status"]
    providers = list(rows[0]["providers"])
    ratios = [(n, b) for n, vs in rows[0].get("ratios", {}).items() for b in vs]
    head = keys + [f"{p} ms" for p in providers] + [f"{n} × {b}" for n, b in ratios] + ["status"]
    lines = [markdown_row(head), "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row.get(k, "")) for k in keys] + [fmt_ms(p, row["providers"].get(p, {})) for p in providers]
        cells += [fmt_ratio(row.get("ratios", {}).get(n, {}).get(b), None) for n, b in ratios]
        lines.append(markdown_row(cells + [row.get("status", "")]))
    return lines + [""]


def render_conv_block(data, chart, plt):
    """Tables per (dtype, layout) of a conv-block run or sweep, and its chart."""
    lines = []
    for (dtype, layout), rows in groups(data["rows"]).items():
        lines += [f"### {dtype}, {layout}", ""]
        if any(r.get("sweep") for r in rows):
            for axis, title in (("batch", "Sweep over batch"), ("resolution", "Sweep over resolution"),
                                ("thin", "Narrow layers (C_in→C_out)")):
                picked = [r for r in rows if r.get("sweep") == axis]
                lines += [f"{title}:", ""] + table(data, picked) + [""] if picked else []
        else:
            lines += table(data, rows) + [""]
    if plt is not None:
        (sweep_chart if "sweep" in data["suite"] else bar_chart)(plt, data, chart)
        lines += [f"![ratios]({os.path.relpath(chart, HERE)})", ""]
    return lines


def _ratio_series(rows):
    """{(fastcnn provider, baseline): [ratio per row]} over the rows."""
    series = {}
    for row in rows:
        for name, vs in row["ratios"].items():
            for baseline, value in vs.items():
                series.setdefault((name, baseline), []).append(value if value is not None else float("nan"))
    return series


def bar_chart(plt, data, path):
    """One panel per (dtype, layout) x mode: grouped bars of each fastcnn backend's ratio vs each baseline."""
    panels = [(key, mode, [r for r in rows if r["mode"] == mode])
              for key, rows in groups(data["rows"]).items() for mode in ("fwd", "fwd+bwd")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 3.4 * len(panels)), squeeze=False)
    for ax, ((dtype, layout), mode, rows) in zip(axes[:, 0], panels):
        series = [(f"{name} vs {baseline}", values) for (name, baseline), values in _ratio_series(rows).items()]
        grouped_bars(ax, series, [f"{r['block']}\n{size_label(r)}" for r in rows],
                     f"{device_label(data['environment'])}: {dtype} {layout}, {mode}")
        target = targets_for(data, dtype, layout)
        for baseline, goal in (target[mode].items() if target else []):
            ax.axhline(goal, linestyle="--", linewidth=0.8, color="gray")
            ax.text(len(rows) - 0.5, goal, f" target vs {baseline}", fontsize=7, va="bottom", ha="right")
    save(plt, fig, path)


def sweep_chart(plt, data, path):
    """Against batch size and against resolution: the ratios (where fastcnn wins or loses) and every provider's
    time (how the cost grows with the work), forward and forward+backward."""
    fig, axes = plt.subplots(2, 4, figsize=(20, 8), squeeze=False)
    for i, axis in enumerate(("batch", "resolution")):
        for j, mode in enumerate(("fwd", "fwd+bwd")):
            rows = [r for r in data["rows"] if r.get("sweep") == axis and r["mode"] == mode]
            xs = [r["shape"]["N"] if axis == "batch" else r["shape"]["H"] for r in rows]
            ratio_ax, time_ax = axes[i, j], axes[i, 2 + j]
            for (name, baseline), values in _ratio_series(rows).items():
                ratio_ax.plot(xs, values, marker="o", label=f"{name} vs {baseline}")
            ratio_ax.axhline(1.0, color="black", linewidth=0.8)
            for name in rows[0]["providers"] if rows else []:
                times = [r["providers"][name].get("median_ms", float("nan")) for r in rows]
                time_ax.plot(xs, times, marker="o", label=name)
            time_ax.set_yscale("log")
            for ax, what in ((ratio_ax, "baseline time / fastcnn time"), (time_ax, "median ms")):
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [str(x) for x in xs])
                ax.minorticks_off()
                ax.set_xlabel(axis)
                ax.set_ylabel(what)
                ax.set_title(f"{mode}: {'ratio' if ax is ratio_ax else 'time'} against {axis}", fontsize=9)
                ax.legend(fontsize=7)
    fig.suptitle(f"{device_label(data['environment'])}: {data['suite']}", fontsize=10)
    save(plt, fig, path, dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--charts", default=os.path.join(HERE, "charts"))
    args = parser.parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        os.makedirs(args.charts, exist_ok=True)
    except ImportError:
        plt = None
    paths = sorted(glob.glob(os.path.join(args.results, "*.json")))
    lines = ["# Benchmark results", "",
             "Rendered by `benchmarks/render.py` from `benchmarks/results/*.json`; do not edit by hand. Times are "
             "medians in ms with the 20%–80% quantiles; ratios are baseline time / fastcnn time (> 1: fastcnn is "
             "faster; on CPU the median of per-round paired ratios) for the routed default `fastcnn` - what a user "
             "gets - where a suite times it, else for the fastest of fastcnn's own backends that passed its "
             "correctness check (`fastcnn[<backend>]`: that backend forced; `fastcnn[reference]` is plain PyTorch, "
             "timed for reference only), ✓/✗ against the targets of `shared/BENCHMARKS.md`. ‡: other "
             "processes were busy during that timing. GPU runs count for "
             "the targets; CPU runs are labelled CPU. See `benchmarks/README.md` for what is measured and how.", ""]
    if plt is None:
        lines += ["Charts skipped: matplotlib is not installed (`pip install matplotlib`, then re-render).", ""]
    if not paths:
        lines += [f"No results in `{os.path.relpath(args.results, HERE)}` yet.", ""]
    for path in paths:
        lines += render_file(path, args.charts, plt)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out} from {len(paths)} result file(s)" + ("" if plt else "; charts skipped (no matplotlib)"))


if __name__ == "__main__":
    main()
