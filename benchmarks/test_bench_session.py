"""The benchmark suites as one pytest-benchmark session: one benchmark per (suite, case, mode, dtype/layout,
provider), parametrised from the bench_*.py scripts' own case lists and provider builders (_session.py, conftest.py).
Each provider's result is checked against the float64 oracle before it is timed; a fastcnn result that fails the
check fails its test. The scripts' JSON results (results/) stay the source of RESULTS.md; this session is for
tracking regressions between commits (--benchmark-autosave, --benchmark-compare; benchmarks/README.md).

    pytest benchmarks --bench-quick [--bench-suites conv_block,optim] [--bench-compile] [--bench-device cpu|cuda]
"""
import torch

import _harness as H


def test_bench(benchmark, bench_param, bench_session, bench_rounds):
    timed, info = bench_session.run(bench_param)  # builds the case, checks the provider (asserts for fastcnn)
    device = bench_session.device
    if device.type == "cuda":
        step = timed

        def timed():
            step()
            torch.cuda.synchronize(device)
    benchmark.group = bench_param.group
    benchmark.extra_info.update(info)
    benchmark.pedantic(timed, setup=H.cache_flusher(device), rounds=bench_rounds, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        ratios = bench_session.record(bench_param, benchmark.stats.stats.median)
        if ratios:
            benchmark.extra_info["ratios"] = ratios
            bench_session.ratios.append((bench_param.group, bench_param.provider, ratios))
