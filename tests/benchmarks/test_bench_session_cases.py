"""The pytest-benchmark session (benchmarks/test_bench_session.py) is parametrised from the bench_*.py scripts' own
case lists and provider builders, for the scripts' own command lines (--quick included): no second copy of the
cases. Collection only, nothing is built or timed."""
import collections
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
import _harness as H  # noqa: E402
import _optim_cases as C  # noqa: E402
import _session as S  # noqa: E402
import bench_conv_block  # noqa: E402
import bench_models  # noqa: E402
import bench_optim  # noqa: E402

CPU = torch.device("cpu")
LAYER_SUITES = ["conv_bn", "residual", "inception", "conv_transpose"]


def _by_suite(params):
    found = collections.defaultdict(list)
    for p in params:
        found[p.suite].append(p)
    return found


@pytest.fixture(scope="module", params=[False, True], ids=["full", "quick"])
def session(request):
    quick = request.param
    return quick, ["--device", "cpu"] + (["--quick"] if quick else []), _by_suite(S.session_params(CPU, quick))


def test_every_suite_and_unique_ids(session):
    _, _, by_suite = session
    assert set(by_suite) == set(S.SUITES)
    ids = [p.id for ps in by_suite.values() for p in ps]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("suite", LAYER_SUITES)
def test_layer_suite_cases_are_the_scripts(session, suite):
    _, argv, by_suite = session
    script = S.SUITES[suite].script
    expected = script.case_specs(H.layer_suite_args("", "", argv), CPU)
    assert {p.spec[1] + (p.mode,) for p in by_suite[suite]} == set(expected)
    providers = {n for n, _ in S.SUITES[suite].providers(None, CPU) if "compile" not in n}
    assert {p.provider for p in by_suite[suite]} == providers and "eager" in providers


def test_conv_block_cases_are_the_scripts(session):
    _, argv, by_suite = session
    args = bench_conv_block.parse_args(argv)
    expected = {(spec, mode) for _, spec in bench_conv_block.cases_for(args, CPU) for mode in bench_conv_block.MODES}
    assert {(p.spec[1], p.mode) for p in by_suite["conv_block"]} == expected
    assert {p.provider for p in by_suite["conv_block"]} == {
        n for n, _ in bench_conv_block.providers(CPU, False)[0] if "compile" not in n}


def test_models_and_optim_cases_are_the_scripts(session):
    _, argv, by_suite = session
    assert {(p.spec[1][0], p.mode) for p in by_suite["models"]} == set(
        bench_models.case_specs(bench_models.parse_args(argv)))
    expected = {(name, set_name, dtype) for name, set_name, _, dtype in bench_optim.cases(bench_optim.parse_args(argv))}
    assert {(p.spec[0], p.key[1], p.spec[2]) for p in by_suite["optim"]} == expected
    for p in by_suite["optim"]:
        assert p.provider in {n for n, *_ in C.providers(p.spec[0], CPU, p.spec[2])[0]}


def test_groups_hold_stock_before_fastcnn(session):
    """Each group (one case, mode and layout) has its baselines first, then the fastcnn providers."""
    _, _, by_suite = session
    for params in by_suite.values():
        groups = collections.defaultdict(list)
        for p in params:
            groups[p.group].append(p.fastcnn)
        for group, subjects in groups.items():
            assert subjects == sorted(subjects) and True in subjects and False in subjects, group


def test_quick_is_the_scripts_quick_scale():
    full, quick = (_by_suite(S.session_params(CPU, q, suites=["conv_block", "residual"])) for q in (False, True))
    assert len(quick["conv_block"]) < len(full["conv_block"])
    assert all(p.spec[1][4] == 1 for p in quick["residual"])  # batch 1
    assert max(p.spec[1][3] for p in quick["residual"]) < min(p.spec[1][3] for p in full["residual"])


def test_compiled_providers_only_when_asked():
    params = S.session_params(CPU, quick=True, compile_too=True, suites=["residual", "models"])
    assert {"compile", "fastcnn+compile"} <= {p.provider for p in params}
    assert not any(S.is_compiled(p.provider) for p in S.session_params(CPU, quick=True, suites=["residual"]))
