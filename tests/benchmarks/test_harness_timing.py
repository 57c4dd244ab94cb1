"""The CPU timing of benchmarks/_timing.py (reached by the suites through _harness.py): providers interleaved in a
fresh random order every round (not a rotation, which keeps each provider's predecessor fixed), per-round times
aligned by round, ratios paired round by round (the median of base[r] / ours[r]) with their spread, and no per-round
times in the results JSON. Synthetic callables and a fake clock: nothing real is timed."""
import json
import math
import os
import sys
import time
import types

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
import _harness as H  # noqa: E402
import _timing as T  # noqa: E402


@pytest.fixture
def fake_clock(monkeypatch):
    """A clock only the callables advance (``clock.advance(ms)``), and no cache flush: the series is exact."""
    now = [0.0]
    clock = types.SimpleNamespace(perf_counter=lambda: now[0], process_time=time.process_time,
                                  monotonic=time.monotonic, sleep=time.sleep)
    clock.advance = lambda ms: now.__setitem__(0, now[0] + ms * 1e-3)
    monkeypatch.setattr(T, "time", clock)
    monkeypatch.setattr(T, "cache_flusher", lambda device: (lambda: None))
    return clock


def _series(fns, rounds, **options):
    return T._time_cpu(fns, budget_s=0.0, min_reps=rounds, max_reps=rounds, **options)


def test_order_is_a_fresh_permutation_every_round_not_a_rotation(fake_clock):
    calls = []
    names = ["a", "b", "c", "d"]
    fns = {n: (lambda n=n: (calls.append(n), fake_clock.advance(1.0))) for n in names}
    rounds = 12
    _series(fns, rounds)
    orders = [calls[r * len(names):(r + 1) * len(names)] for r in range(rounds)]
    assert all(sorted(order) == names for order in orders)  # each provider once per round
    predecessors = {n: {order[order.index(n) - 1] for order in orders} for n in names}  # cyclic, as a rotation keeps
    assert any(len(p) >= 2 for p in predecessors.values()), predecessors
    rotations = [names[k:] + names[:k] for k in range(len(names))]
    assert any(order not in rotations for order in orders)
    calls.clear()
    _series(fns, rounds)  # seeded per series: the same orders again
    assert [calls[r * len(names):(r + 1) * len(names)] for r in range(rounds)] == orders


def test_rounds_are_aligned_and_paired(fake_clock):
    """A drift of 100x between rounds: each round's pair still has base = 2 x ours."""
    drift = [1.0, 100.0, 3.0, 50.0, 1.0, 7.0]
    done = {"base": 0, "ours": 0}

    def provider(name, factor):
        def fn():
            fake_clock.advance(factor * drift[done[name]])
            done[name] += 1
        return fn

    result = _series({"base": provider("base", 2.0), "ours": provider("ours", 1.0)}, len(drift))
    assert result["base"][H.ROUNDS] == pytest.approx([2 * d for d in drift])
    assert result["ours"][H.ROUNDS] == pytest.approx(drift)
    ratio, spread = H.paired_ratio(result["base"], result["ours"])
    assert ratio == pytest.approx(2.0) and spread == pytest.approx([2.0, 2.0])
    assert result["base"]["reps"] == len(drift)


def test_paired_ratio_is_the_median_of_per_round_ratios_not_the_ratio_of_medians():
    base = {"median_ms": 3.0, H.ROUNDS: [1.0, 2.0, 3.0, 4.0, 5.0]}
    ours = {"median_ms": 3.0, H.ROUNDS: [2.0, 1.0, 4.0, 3.0, 6.0]}
    # per-round ratios 0.5, 2, 0.75, 1.33, 0.83: median 0.83 (the ratio of the medians would be 1.0)
    ratio, (p20, p80) = H.paired_ratio(base, ours)
    assert ratio == pytest.approx(5 / 6)
    assert (p20, p80) == (pytest.approx(0.75), pytest.approx(2.0))
    assert H.paired_ratio(ours, base)[0] == pytest.approx(6 / 5)  # swapping inverts it
    even = H.paired_ratio({H.ROUNDS: [1.0, 4.0]}, {H.ROUNDS: [1.0, 1.0]})[0]
    assert even == pytest.approx(2.0)  # even count: the geometric mean of the middle two, so inversion is exact


def test_ratio_of_medians_without_rounds():
    """GPU (do_bench): no per-round times, the ratio of the medians and no spread."""
    assert H.paired_ratio({"median_ms": 3.0}, {"median_ms": 1.5}) == (2.0, None)
    mismatched = H.paired_ratio({"median_ms": 3.0, H.ROUNDS: [3.0, 3.0]}, {"median_ms": 1.5, H.ROUNDS: [1.5]})
    assert mismatched == (2.0, None)


def test_finish_row_and_results_file(tmp_path):
    row = {"providers": {
        "eager": {"median_ms": 3.0, "ok": True, H.ROUNDS: [1.0, 2.0, 3.0, 4.0, 5.0]},
        "compile": {"median_ms": 4.0, "ok": True},  # no rounds: ratio of medians
        "fastcnn": {"median_ms": 3.0, "ok": True, H.ROUNDS: [2.0, 1.0, 4.0, 3.0, 6.0]},
        "fastcnn[triton]": {"median_ms": 1.0, "ok": False, H.ROUNDS: [1.0] * 5},
    }, "ratios": {}}
    H.finish_row(row)
    assert row["ratios"]["fastcnn"] == {"eager": pytest.approx(5 / 6), "compile": pytest.approx(4 / 3)}
    assert row["ratio_spread"]["fastcnn"] == {"eager": [pytest.approx(0.75), pytest.approx(2.0)], "compile": None}
    assert row["ratios"]["fastcnn[triton]"] == {"eager": None, "compile": None}
    assert row["ratio_spread"]["fastcnn[triton]"] == {"eager": None, "compile": None}
    assert row["status"] == "failed"
    env = {"device_type": "cpu", "device_name": "test cpu"}
    path = H.write_results("unit", env, {}, [row], out_dir=str(tmp_path))
    with open(path) as f:
        text = f.read()
    assert H.ROUNDS not in text
    saved = json.load(open(path))["rows"][0]
    assert saved["ratios"]["fastcnn"]["eager"] == pytest.approx(5 / 6)
    assert saved["ratio_spread"]["fastcnn"]["eager"] == pytest.approx([0.75, 2.0])
    assert H.ROUNDS in row["providers"]["eager"]  # the rows in memory are left as they were
    assert all(math.isfinite(v) for v in saved["ratios"]["fastcnn"].values())
