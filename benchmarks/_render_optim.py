"""The optimizer suite's part of benchmarks/render.py: a summary table (one line per optimizer x parameter set x
dtype), a table per case (every provider's time, speed-up, bandwidth and state dtype) and a bar chart of the
speed-ups. The targets and their verdicts come from the result file (bench_optim.targets), not from here."""
import math
import os

from _charts import grouped_bars, markdown_row, save

BASELINE_ORDER = ("torch fused", "torch foreach", "torch single-tensor", "unfused LARS")


def _best(row):
    passed = [n for n, r in row["providers"].items() if r["role"] == "fastcnn" and r.get("ok") and "median_ms" in r]
    return min(passed, key=lambda n: row["providers"][n]["median_ms"], default=None)


def _ms(r, busy_cores):
    if "median_ms" not in r:
        return "error"
    mark = " ‡" if r.get("other_cpu", 0) > busy_cores else ""
    return f"{r['median_ms']:.1f} ({r['p20_ms']:.1f}–{r['p80_ms']:.1f}){mark}"


def _check(r):
    if "check" not in r:
        return ""
    verdict = "pass" if r["ok"] else "**FAIL**"
    if r["check"] == "lockstep":
        detail = f"{r['max_ulps']:.2f} ulps from {r['partner']} (tolerance {r['tolerance_ulps']})"
    else:
        detail = f"err {r['max_abs_err']:.1e} = {r['err_over_allowed']:.2f}× allowed (float64 oracle)"
        if "lockstep_ulps" in r:
            detail += f"; {r['lockstep_ulps']:.1f} ulps from {r['partner']}"
    return f"{verdict}: {detail}, {r['steps']} steps"


def _targets(row):
    marks = []
    for t in row.get("targets", []):
        value = "—" if t["value"] is None else (f"{100 * t['value']:.0f}%" if "bandwidth" in t["what"]
                                                else f"{t['value']:.2f}")
        goal = f"{100 * t['goal']:.0f}%" if "bandwidth" in t["what"] else f"{t['goal']}"
        marks.append(f"{value} {t['what']} {'✓' if t['met'] else '✗'} ({'≥' if t['at_least'] else '≤'}{goal})")
    return "; ".join(marks)


def _case_name(row):
    return f"{row['optimizer']}, {row['param_set']} ({row['params'] / 1e6:.2f}M params, {row['tensors']} tensors), " \
           f"{row['dtype']}"


def summary_table(rows):
    head = ["optimizer", "params", "dtype", "best fastcnn", "ms"] + [f"× {b}" for b in BASELINE_ORDER] + \
        ["LARS / SGD time", "GB/s", "copy BW", "check", "targets"]
    lines = [markdown_row(head), "|" + "---|" * len(head)]
    for row in rows:
        best = _best(row)
        r = row["providers"].get(best, {})
        ratios = row["ratios"].get(best, {})
        cells = [row["optimizer"], row["param_set"], row["dtype"], best or "none passed",
                 f"{r['median_ms']:.1f}" if best else "—"]
        cells += [f"{ratios[b]:.2f}×" if ratios.get(b) is not None else "" for b in BASELINE_ORDER]
        lars_sgd = row.get("lars_over_sgd", {}).get(best)
        cells += [f"{lars_sgd:.2f}" if lars_sgd is not None else "",
                  f"{r['gbps']:.1f}" if best else "—", f"{100 * r['copy_fraction']:.0f}%" if best else "—",
                  "pass" if row["status"] == "ok" else "**FAIL**", _targets(row)]
        lines.append(markdown_row(cells))
    return lines


def case_table(row, busy_cores):
    best = _best(row)
    best_ms = row["providers"][best]["median_ms"] if best else None
    head = ["provider", "state dtype", "B/param", "median ms (20–80%)", "its time / best fastcnn's", "GB/s",
            "copy BW", "check"]
    lines = [f"**{_case_name(row)}** — hyper-parameters `{row['hyper']}`", "",
             markdown_row(head), "|" + "---|" * len(head)]
    for name, r in row["providers"].items():
        timed = "median_ms" in r
        ratio = f"{r['median_ms'] / best_ms:.2f}×" if timed and best_ms else "—"
        cells = [name, r.get("state_dtype", ""), f"{r['bytes_per_param']:.0f}" if timed else "", _ms(r, busy_cores),
                 ratio, f"{r['gbps']:.2f}" if timed else "", f"{100 * r['copy_fraction']:.0f}%" if timed else "",
                 _check(r) or r.get("error", "")]
        lines.append(markdown_row(cells))
    return lines + [""]


def render_optim(data, chart, plt, device_label, busy_cores):
    """Markdown lines of one optimizer result file; writes its chart to ``chart`` when ``plt`` is given."""
    rows = data["rows"]
    lines = ["Summary: the fastest fastcnn backend that passed its check; × = baseline time / its time (> 1: "
             "fastcnn faster); LARS / SGD time = fastcnn's LARS step over its own SGD-momentum step; GB/s and copy "
             "BW from the bytes the ideal step moves (`B/param` below).", ""] + summary_table(rows) + [""]
    if plt is not None and rows:
        bar_chart(plt, data, chart, device_label)
        lines += [f"![optimizer speed-ups]({os.path.relpath(chart, os.path.dirname(__file__))})", ""]
    for row in rows:
        lines += case_table(row, busy_cores)
    return lines


def bar_chart(plt, data, path, device_label):
    """One panel per (parameter set, dtype): per optimizer, bars of the best fastcnn's speed-up over each
    baseline (log scale; the line at 1 is parity)."""
    panels = {}
    for row in data["rows"]:
        panels.setdefault((row["param_set"], row["dtype"]), []).append(row)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for ax, ((param_set, dtype), rows) in zip(axes[:, 0], panels.items()):
        series = []
        for baseline in BASELINE_ORDER:
            values = [row["ratios"].get(_best(row), {}).get(baseline) for row in rows]
            if any(v is not None for v in values):
                series.append((f"vs {baseline}", [math.nan if v is None else v for v in values]))
        grouped_bars(ax, series, [row["optimizer"] for row in rows],
                     f"{device_label}: optimizer step, {param_set}, {dtype} params")
        ax.set_yscale("log")
    save(plt, fig, path)
