"""Timing for the benchmark suites (protocol: shared/BENCHMARKS.md). GPU: ``triton.testing.do_bench`` (CUDA events,
warm-up, L2 flushed before every repeat; median and the 20%/80% quantiles). CPU: ``time.perf_counter`` around each
call after warm-up, a 64 MiB buffer rewritten before every repeat so the last-level cache does not flatter anyone;
median and the 20%/80% quantiles of the repeats, the providers interleaved in a fresh random order every round and
their ratios paired round by round (`_time_cpu`, `paired_ratio`). CPU calls are synchronous, so no synchronisation
is needed before reading the clock; on GPU the events synchronise."""
import math
import os
import random
import statistics
import time

import torch


class _CacheFlusher:
    """Rewrites a buffer larger than any last-level cache (CPU; on GPU do_bench flushes L2 itself)."""

    def __init__(self):
        self.buffer = torch.empty(16 << 20, dtype=torch.float32)  # 64 MiB

    def __call__(self):
        self.buffer.fill_(1.0)


_flush = None


def cache_flusher(device):
    """The callable run before every timed repeat: on CPU a 64 MiB buffer rewritten (``bench``'s own); on GPU a
    256 MiB buffer zeroed, as ``do_bench`` flushes L2, then a synchronisation (for timers outside ``bench``: the
    pytest-benchmark session)."""
    global _flush
    if device.type != "cuda":
        _flush = _flush or _CacheFlusher()
        return _flush
    buffer = torch.empty(64 << 20, dtype=torch.int32, device=device)

    def flush():
        buffer.zero_()
        torch.cuda.synchronize(device)
    return flush


BUSY_CORES = 0.25  # other processes using more CPU than this during a CPU timing make it suspect


def _machine_busy_s():
    """CPU seconds all processes have used (user, nice, system, irq, softirq, steal), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _pick(ordered, q):
    """The ``q`` quantile of a sorted list (the element at index floor(q n))."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _quantiles(times_ms):
    times = sorted(times_ms)
    return {"median_ms": statistics.median(times), "p20_ms": _pick(times, 0.2), "p80_ms": _pick(times, 0.8),
            "reps": len(times)}


ROUNDS = "rounds_ms"  # a CPU timing's per-round times, aligned by round across a series' providers (not saved)


def _time_cpu(fns, budget_s, min_reps, max_reps, seed=0):
    """One timed series of every callable in ``fns`` (name -> fn), interleaved: each round runs each callable once,
    the cache flushed before each, in a fresh random order every round (``random.Random(seed)``, made anew for each
    series, so a run is reproducible). A slow drift of the machine's speed (a neighbour on the host, the allocator's
    state, the clock) then lands on every provider alike instead of on whichever ran during it. The order is a
    random permutation rather than a rotation because a rotation keeps each provider's predecessor fixed (it preserves
    cyclic adjacency), and what ran just before a call - its cache and allocator leftovers, the core's frequency -
    shifts that call's time: a control timing stock against the same stock module twice swung 0.95-1.08 with
    rotated orders and per-provider medians, 0.997-1.004 with random orders and paired ratios (2-core VM).
    Returns name -> quantiles, each with ``other_cpu``: cores' worth of CPU other processes used during the series,
    and ``rounds_ms``: its time in each round, aligned by round across the providers, for `paired_ratio`
    (`write_results` leaves these out of the JSON)."""
    flush = cache_flusher(torch.device("cpu"))
    order = random.Random(seed)
    names = list(fns)
    times = {name: [] for name in names}
    busy0, own0, wall0 = _machine_busy_s(), time.process_time(), time.perf_counter()
    deadline = wall0 + budget_s * len(names)
    rounds = 0
    while rounds < min_reps or (rounds < max_reps and time.perf_counter() < deadline):
        for name in order.sample(names, len(names)):
            flush()
            start = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
        rounds += 1
    other = None
    if busy0 is not None:
        other = (_machine_busy_s() - busy0) - (time.process_time() - own0)
        other = round(max(0.0, other) / (time.perf_counter() - wall0), 3)
    return {name: dict(_quantiles(t), **({} if other is None else {"other_cpu": other}), **{ROUNDS: t})
            for name, t in times.items()}


RATIO_QUANTILES = (0.2, 0.8)  # the spread of the paired per-round ratios recorded beside each ratio


def paired_ratio(base, ours):
    """``base``'s time / ``ours``'s time (> 1: ``ours`` faster) from two timing results of the same series (dicts from
    `bench_all`) -> (ratio, [p20, p80] or None). Where both have per-round times (CPU, `_time_cpu`): the median over
    rounds of the paired ratio base[r] / ours[r], taken as exp(median(log)) so that swapping the two inverts it
    exactly, and the 20%/80% quantiles of those per-round ratios as the spread; a drift of the machine's speed during
    the series then cancels within each pair instead of landing on whichever provider's median it moves. Otherwise
    (GPU ``do_bench``, no rounds): the ratio of the medians, and no spread."""
    b, o = base.get(ROUNDS), ours.get(ROUNDS)
    if not b or not o or len(b) != len(o):
        return base["median_ms"] / ours["median_ms"], None
    logs = sorted(math.log(x / y) for x, y in zip(b, o))
    return math.exp(statistics.median(logs)), [math.exp(_pick(logs, q)) for q in RATIO_QUANTILES]


def set_ratios(row, name, baselines, passed=True):
    """``row["ratios"][name][b]`` = `paired_ratio` of each baseline ``b`` over fastcnn provider ``name`` (None when it
    did not pass its check), and ``row["ratio_spread"][name][b]`` = [p20, p80] of the paired per-round ratios (None
    without rounds: GPU, or a failed check)."""
    results = row["providers"]
    pairs = {b: paired_ratio(results[b], results[name]) if passed else (None, None) for b in baselines}
    row.setdefault("ratios", {})[name] = {b: ratio for b, (ratio, _) in pairs.items()}
    row.setdefault("ratio_spread", {})[name] = {b: spread for b, (_, spread) in pairs.items()}


def bench_all(fns, device, budget_s=1.0, min_reps=5, max_reps=100, warmup=2, retries=3, retry_wait_s=20):
    """Times the providers of one case against each other: ``fns`` (name -> fn) -> name -> {median_ms, p20_ms,
    p80_ms, reps[, other_cpu, attempts, rounds_ms]}. ``budget_s`` bounds each provider's measured time after warm-up:
    at least ``min_reps`` repeats, more while the budget lasts. On CPU the repeats are interleaved across providers in
    a random order per round (`_time_cpu`), each provider's per-round times kept aligned in ``rounds_ms`` for the
    paired ratios (`paired_ratio`, `set_ratios`); a series during which other processes used more than BUSY_CORES is
    repeated after a pause (up to ``retries`` times) and the least disturbed series is kept whole, its ``other_cpu``
    recorded. On GPU each provider is timed on its own (CUDA events are not disturbed that way; no rounds)."""
    if device.type == "cuda":
        import triton.testing  # on the GPU machine triton ships with torch
        results = {}
        for name, fn in fns.items():
            median, p20, p80 = triton.testing.do_bench(fn, warmup=max(25, 100 * budget_s),
                                                       rep=1000 * budget_s, quantiles=[0.5, 0.2, 0.8])
            results[name] = {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "reps": None}
        return results
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = None
    for attempt in range(1, retries + 2):
        results = _time_cpu(fns, budget_s, min_reps, max_reps)
        other = next(iter(results.values())).get("other_cpu", 0)
        if best is None or other < best[0]:
            best = (other, results)
        if best[0] <= BUSY_CORES or attempt > retries:
            return {name: dict(result, attempts=attempt) for name, result in best[1].items()}
        print(f"  (other processes used {other:.2f} cores meanwhile: timing again in {retry_wait_s}s)", flush=True)
        time.sleep(retry_wait_s)


def bench(fn, device, **options):
    """Times one callable (`bench_all` with one provider)."""
    return bench_all({"fn": fn}, device, **options)["fn"]


def cuda_graphed(fn):
    """A replay of ``fn`` captured in a CUDA graph (after warm-up on a side stream), to take launch overhead out of
    small-batch timings. Only for functions without host synchronisation or allocation changes between calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()

    def replay():
        graph.replay()
        return outputs
    return replay
