"""The pytest-benchmark session over the benchmark suites (``pytest benchmarks``; benchmarks/README.md): options, the
parametrisation (from the bench_*.py scripts' own case lists, through _session.py) and the ratio summary."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _session  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("fastcnn benchmarks", "the benchmark suites as a pytest-benchmark session")
    group.addoption("--bench-quick", action="store_true",
                    help="each script's --quick cases (small shapes, batch 1) and at most 3 rounds: a few minutes")
    group.addoption("--bench-compile", action="store_true",
                    help="also the torch.compile providers (compile, max-autotune on GPU, fastcnn+compile): slow")
    group.addoption("--bench-device", choices=["cpu", "cuda"],
                    help="the device (default: cuda when there is a GPU, else cpu)")
    group.addoption("--bench-suites", help="comma-separated subset of " + ",".join(_session.SUITES))


def _device(config):
    return torch.device(config.getoption("bench_device") or ("cuda" if torch.cuda.is_available() else "cpu"))


def pytest_generate_tests(metafunc):
    if "bench_param" not in metafunc.fixturenames:
        return
    config = metafunc.config
    suites = config.getoption("bench_suites")
    suites = suites.split(",") if suites else None
    unknown = [s for s in suites or () if s not in _session.SUITES]
    if unknown:
        raise pytest.UsageError(f"--bench-suites: unknown {', '.join(unknown)}; expected some of "
                                + ", ".join(_session.SUITES))
    params = _session.session_params(_device(config), config.getoption("bench_quick"),
                                     config.getoption("bench_compile"), suites)
    metafunc.parametrize("bench_param", params, ids=[p.id for p in params])


@pytest.fixture(scope="session")
def bench_session(request):
    device = _device(request.config)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as eager users set it, and as the scripts do
    session = _session.Session(device)
    request.config._fastcnn_bench_session = session
    return session


@pytest.fixture(scope="session")
def bench_rounds(request):
    """Timed rounds per benchmark: --benchmark-min-rounds (default 5), at most 3 with --bench-quick."""
    rounds = request.config.getoption("benchmark_min_rounds")
    return min(rounds, 3) if request.config.getoption("bench_quick") else rounds


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_fastcnn_bench_session", None)
    lines = [f"{group}: {provider} " + ", ".join(f"x{v:.2f} vs {b}" for b, v in ratios.items())
             for group, provider, ratios in (session.ratios if session else []) if ratios]
    if lines:
        terminalreporter.write_sep("-", "ratios: baseline median / fastcnn median (> 1: fastcnn faster)")
        for line in lines:
            terminalreporter.write_line(line)
