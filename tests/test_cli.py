"""The fastcnn command (through `python -m fastcnn`, which the console script calls): help for every subcommand,
every failure as one `error:` line with its exit status (bad arguments, --out a file, no GPU, a forced backend,
checkpoints that are truncated, foreign or of another model, corrupt images), Ctrl-C leaving a resumable checkpoint,
options that take effect (--image-size on .npz, --width/--channels on the models, --no-progress), and small real
runs of verify, train, bench and cam."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastcnn import cli
from fastcnn.train import load_checkpoint
from fastcnn.train.trainer import Trainer

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
    (["train", "--model", "mlp", "--width", "0.5"], "--width applies to VGG and ResNet models; mlp has none"),
    (["train", "--model", "resnet18", "--hidden-features", "8"], "--hidden-features applies to VGG models"),
    (["verify", "--model", "encoder_decoder"], "encoder_decoder is a segmentation model"),
    (["train", "--device", "gpu"], "--device 'gpu' is not a device"),
    (["train", "--resume", "no/such.pt"], "--resume 'no/such.pt': no such checkpoint file"),
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
    cam_options = SMALL[:-2]  # cam reads one image: --batch-size is refused
    assert cli.main(["cam", *cam_options, "--checkpoint", str(tmp_path / "last.pt"), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["bench", *SMALL, "--steps", "1"]) == 0 and "x stock" in capsys.readouterr().out
    result = _run("info")  # `python -m fastcnn` end to end
    assert result.returncode == 0 and "fastcnn" in result.stdout, result.stderr


# the fastest model: the tests below are about the command, not the network
MLP = ["--model", "mlp", "--image-size", "8", "--no-progress"]


def _error_line(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_cuda_without_a_gpu_and_an_unusable_forced_backend_fail_cleanly(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", *MLP, "--device", "cuda"])
    assert exit_info.value.code == 2 and "--device cuda: no CUDA GPU is available here" in _error_line(capsys)
    for forced, message in (("cuda", "FASTCNN_BACKEND=cuda cannot run on cpu"), ("fast", "'fast' is not a backend")):
        monkeypatch.setenv("FASTCNN_BACKEND", forced)
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["verify", *MLP, "--device", "cpu"])
        assert exit_info.value.code == 2 and message in _error_line(capsys)


def test_out_that_is_a_file_is_refused_before_the_data_is_read(tmp_path, monkeypatch, capsys):
    (tmp_path / "taken").write_text("not a folder")
    monkeypatch.setattr(cli, "_loaders", lambda *a, **k: pytest.fail("data read before --out was checked"))
    for out, message in ((tmp_path / "taken", "is a file; it must be a folder"),
                         (tmp_path / "taken" / "run", "is a file, not a folder")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", *MLP, "--out", str(out)])
        assert exit_info.value.code == 2 and message in _error_line(capsys)


def test_bad_checkpoints_are_one_line_each(tmp_path, capsys):
    assert cli.main(["train", *MLP, "--epochs", "1", "--out", str(tmp_path)]) == 0
    good = tmp_path / "last.pt"
    truncated, foreign = tmp_path / "truncated.pt", tmp_path / "foreign.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    torch.save({"model": torch.nn.Linear(2, 2)}, foreign)  # a pickled module, not a state_dict
    capsys.readouterr()
    cases = (([*MLP, "--resume", str(truncated)], "truncated or not a PyTorch checkpoint"),
             ([*MLP, "--resume", str(foreign)], "holds a pickled torch.nn.modules.linear.Linear"),
             (["--model", "logistic_regression", "--image-size", "8", "--resume", str(good)],
              "seems to hold mlp (192 input features, 10 classes), this model is logistic_regression"),
             ([*MLP, "--channels", "1", "--resume", str(good)], "shapes differ (checkpoint vs model): 1.weight"),
             ([*MLP, "--optimizer", "adam", "--resume", str(good)], "trained with the SGD optimizer, this run uses"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", *argv, "--epochs", "2", "--out", str(tmp_path / "resumed")])
        line = _error_line(capsys)
        assert exit_info.value.code == 2 and message in line and "weights_only" not in line, line


def test_ctrl_c_mid_epoch_says_how_to_resume_and_leaves_no_temporary_files(tmp_path, monkeypatch, capsys):
    calls, step = [], Trainer.optimizer_step

    def interrupted_step(self):
        calls.append(1)
        if len(calls) == 45:  # epoch 2, batch 5 (40 batches of 32 per epoch)
            raise KeyboardInterrupt
        step(self)

    monkeypatch.setattr(Trainer, "optimizer_step", interrupted_step)
    argv = ["train", *MLP, "--epochs", "2", "--out", str(tmp_path)]
    assert cli.main(argv) == 130
    out, err = capsys.readouterr()
    assert "epoch 1 lr" in out  # --no-progress keeps the metric lines
    assert "interrupted after 1 complete epoch(s)" in err and f"--resume {tmp_path / 'last.pt'}" in err
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert load_checkpoint(str(tmp_path / "last.pt"))["epoch"] == 0
    monkeypatch.undo()
    assert cli.main([*argv, "--resume", str(tmp_path / "last.pt")]) == 0
    assert "epoch 2 lr" in capsys.readouterr().out and load_checkpoint(str(tmp_path / "last.pt"))["epoch"] == 1


def test_corrupt_images_stop_the_run_or_are_skipped(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).save(tmp_path / "data" / label / f"{i}.png")
    (tmp_path / "data" / "b" / "4.png").write_bytes(b"garbage")
    argv = ["train", *MLP, "--data", str(tmp_path / "data"), "--epochs", "1", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and "1 of 12 images" in _error_line(capsys)
    assert not (tmp_path / "run" / "last.pt").exists()
    assert cli.main([*argv, "--skip-bad-images"]) == 0
    assert "warning: skipping 1 unreadable images" in capsys.readouterr().err


def test_image_size_resizes_npz_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    arrays = {f"{split}_images": rng.integers(0, 256, (40, 28, 28), dtype=np.uint8) for split in ("train", "val")}
    arrays |= {f"{split}_labels": rng.integers(0, 3, (40, 1)) for split in ("train", "val")}
    np.savez(tmp_path / "tiny.npz", **arrays)
    # the mlp is built for 1 x 12 x 12 inputs: it trains only if the 28 px images were resized
    assert cli.main(["train", *MLP, "--image-size", "12", "--channels", "1", "--data", str(tmp_path / "tiny.npz"),
                     "--epochs", "1", "--out", str(tmp_path / "run")]) == 0


@pytest.mark.parametrize("model", [["--model", "vgg11", "--width", "0.125", "--hidden-features", "16"],
                                   ["--model", "resnet18", "--width", "0.125"]])
def test_width_and_one_channel_reach_the_model(model):
    args = cli.build_parser().parse_args(["train", *model, "--channels", "1"])
    one_channel = cli._build_model(args, 10)
    assert one_channel(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    three_channels = cli._build_model(cli.build_parser().parse_args(["train", *model]), 10)
    assert one_channel.state_dict().keys() == three_channels.state_dict().keys()
    assert next(iter(three_channels.state_dict().values())).shape[:2] == (8, 3)  # 64 x 0.125 filters


def test_verify_no_progress_reaches_verify(monkeypatch, capsys):
    seen = {}

    def fake_verify(models, *loaders, **kwargs):
        seen.update(kwargs, models=models)
        raise KeyboardInterrupt

    monkeypatch.setattr("fastcnn.train.verify.verify", fake_verify)
    assert cli.main(["verify", *MLP, "--channels", "1"]) == 130
    assert seen["progress"] is False and seen["models"][0](torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert capsys.readouterr().err.strip() == "fastcnn verify: interrupted"


def test_unexpected_errors_are_one_line_unless_debugging(monkeypatch, capsys):
    def bug(args):
        raise TypeError("'NoneType' object is not callable")

    monkeypatch.setitem(cli.COMMANDS, "info", bug)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["info"])
    assert exit_info.value.code == 1 and "unexpected TypeError" in _error_line(capsys)
    monkeypatch.setenv("FASTCNN_DEBUG", "1")
    with pytest.raises(TypeError):
        cli.main(["info"])


def test_a_failure_prints_no_traceback_end_to_end(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 a cut-off zip")
    result = _run("train", *MLP, "--resume", str(tmp_path / "last.pt"), "--out", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("fastcnn train: error: cannot read checkpoint") and result.stderr.count("\n") == 1
