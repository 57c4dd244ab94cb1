"""The fastcnn command (through `python -m fastcnn`, which the console script calls): help for every subcommand,
exit codes of bad arguments, and small real runs of verify, train, bench and cam."""
import os
import subprocess
import sys

import pytest

from fastcnn import cli

SUBCOMMANDS = ("train", "verify", "bench", "cam", "info")
# a VGG small enough for a test run on two cores
SMALL = ["--model", "vgg11", "--width", "0.125", "--hidden-features", "32", "--image-size", "32", "--batch-size", "128"]


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fastcnn", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    output = capsys.readouterr().out
    assert exit_info.value.code == 0 and all(name in output for name in SUBCOMMANDS)
    parser = cli.build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            assert action.help, f"fastcnn {name}: option {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("argv, message", [
    ([], "required"),
    (["fly"], "invalid choice"),
    (["verify", "--epochs", "0"], "--epochs must be > 0"),
    (["train", "--optimizer", "rmsprop"], "invalid choice"),
    (["verify", "--data", "no/such/folder"], "data source"),
    (["verify", "--model", "alexnet"], "unknown model"),
    (["bench", "--suite", "nonexistent"], "bench_nonexistent.py"),
])
def test_bad_arguments_exit_non_zero_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_verify_train_cam_bench_and_info_run(tmp_path, capsys):
    assert cli.main(["verify", *SMALL, "--epochs", "1"]) in (0, 1)
    output = capsys.readouterr().out
    assert "parity" in output and "images/s" in output and "validation accuracy" in output
    assert cli.main(["train", *SMALL, "--epochs", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    assert {"last.pt", "log.csv", "loss.png"} <= set(os.listdir(tmp_path))
    png = tmp_path / "cam.png"
    assert cli.main(["cam", *SMALL, "--checkpoint", str(tmp_path / "last.pt"), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["bench", *SMALL, "--steps", "1"]) == 0 and "x stock" in capsys.readouterr().out
    result = _run("info")  # `python -m fastcnn` end to end
    assert result.returncode == 0 and "fastcnn" in result.stdout, result.stderr
