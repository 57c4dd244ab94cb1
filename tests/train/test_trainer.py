"""The Trainer: kill-and-resume equals an uninterrupted run bit for bit, atomic checkpoints (also under Ctrl-C),
checkpoints that do not fit refused in one line, accumulation equals a big batch, bf16/channels_last/clipping, the
tqdm progress bar, logs and plots, segmentation mIoU."""
import io
import os

import pytest
import torch
import torch.nn as nn
from _models import digit_batches, tiny_cnn

from fastcnn.data import make_loader
from fastcnn.train import EpochMetrics, Trainer, load_checkpoint, mean_iou, save_checkpoint, seed_everything
from fastcnn.train import checkpoint as checkpoint_module
from fastcnn.train.log import ProgressBar
from fastcnn.train.model_state import CheckpointError


class Crash(Exception):
    pass


def _run(tmp_path, epochs, resume=None, crash_after=None, seed=0):
    seed_everything(seed)
    model = tiny_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    def crash(trainer, record):
        if record["epoch"] == crash_after:
            raise Crash

    loader = make_loader(digit_batches(), 16, shuffle=True)
    trainer = Trainer(model, optimizer, loader, make_loader(digit_batches(seed=1), 16), scheduler=scheduler,
                      checkpoint_path=str(tmp_path / "last.pt"), progress=False, callbacks=[crash])
    history = trainer.fit(epochs, resume=resume)
    return model, history


def test_kill_and_resume_gives_the_uninterrupted_trajectory_bitwise(tmp_path):
    straight, straight_history = _run(tmp_path / "a", 3)
    with pytest.raises(Crash):
        _run(tmp_path / "b", 3, crash_after=2)
    assert load_checkpoint(str(tmp_path / "b" / "last.pt"))["epoch"] == 1
    resumed, resumed_history = _run(tmp_path / "b", 3, resume=str(tmp_path / "b" / "last.pt"), seed=123)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    drop_time = [{k: v for k, v in r.items() if k != "seconds"} for r in (straight_history + resumed_history)]
    assert drop_time[:3] == drop_time[3:]
    assert [r["lr"] for r in resumed_history] == [0.1, 0.05, 0.025]


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_checkpoint_write_is_atomic(tmp_path, monkeypatch, failure):
    path = str(tmp_path / "ck.pt")
    save_checkpoint(path, {"epoch": 1, "weight": torch.ones(3)})

    def torn_write(state, file):
        file.write(b"half a checkpoint")
        raise failure

    monkeypatch.setattr(checkpoint_module.torch, "save", torn_write)
    with pytest.raises(type(failure)):
        save_checkpoint(path, {"epoch": 2, "weight": torch.zeros(3)})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["ck.pt"]
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(str(tmp_path / "missing.pt"))


def test_ctrl_c_mid_epoch_keeps_the_last_whole_checkpoint(tmp_path, monkeypatch):
    calls, step = [], Trainer.optimizer_step

    def interrupted_step(self):
        calls.append(1)
        if len(calls) == 6:  # the second epoch's second step (4 batches of 16 per epoch)
            raise KeyboardInterrupt
        step(self)

    monkeypatch.setattr(Trainer, "optimizer_step", interrupted_step)
    model = tiny_cnn()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), make_loader(digit_batches(), 16),
                      checkpoint_path=str(tmp_path / "last.pt"), log_dir=str(tmp_path), progress=False)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(3)
    assert trainer.last_checkpoint == str(tmp_path / "last.pt") and len(trainer.history) == 1
    assert load_checkpoint(trainer.last_checkpoint)["epoch"] == 0
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def _trainer(model, optimizer_class=torch.optim.SGD):
    return Trainer(model, optimizer_class(model.parameters(), lr=0.1), make_loader(digit_batches(), 16),
                   progress=False)


def test_resume_refuses_checkpoints_that_do_not_fit_in_one_line(tmp_path):
    path = str(tmp_path / "last.pt")
    trained = _trainer(tiny_cnn())
    save_checkpoint(path, trained.state_dict(0))
    with pytest.raises(CheckpointError, match=r"shapes differ.*0\.weight \(8, 1, 3, 3\) vs \(8, 3, 3, 3\)"):
        _trainer(tiny_cnn(in_channels=3)).fit(2, resume=path)
    with pytest.raises(CheckpointError, match="missing keys: 1.weight"):
        _trainer(tiny_cnn(batch_norm=True)).fit(2, resume=path)
    with pytest.raises(CheckpointError, match="trained with the SGD optimizer, this run uses Adam"):
        _trainer(tiny_cnn(), torch.optim.Adam).fit(2, resume=path)
    save_checkpoint(path, tiny_cnn().state_dict())
    with pytest.raises(CheckpointError, match="bare model state_dict"):
        _trainer(tiny_cnn()).fit(2, resume=path)


class _Opaque:
    pass


def test_unreadable_checkpoints_are_named_without_advising_unsafe_loading(tmp_path):
    good, truncated, foreign = (str(tmp_path / name) for name in ("good.pt", "truncated.pt", "foreign.pt"))
    save_checkpoint(good, {"epoch": 1, "weight": torch.ones(100)})
    with open(good, "rb") as file:
        data = file.read()
    with open(truncated, "wb") as file:
        file.write(data[: len(data) // 2])
    torch.save({"epoch": 1, "extra": _Opaque()}, foreign)
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint") as truncated_error:
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="pickled .*_Opaque") as foreign_error:
        load_checkpoint(foreign)
    for error in (truncated_error, foreign_error):
        assert "weights_only" not in str(error.value) and "\n" not in str(error.value)


def test_progress_bar_is_tqdm_on_a_terminal_and_silent_elsewhere(capsys):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal, log_file = Terminal(), io.StringIO()
    for stream in (terminal, log_file):
        bar = ProgressBar(4, "epoch 1/1 train", stream=stream)
        for _ in range(4):
            bar.update(loss=0.5)
        bar.close()
    assert "epoch 1/1 train" in terminal.getvalue() and "4/4" in terminal.getvalue()
    assert "loss=0.5" in terminal.getvalue() and log_file.getvalue() == ""
    model = tiny_cnn()
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), make_loader(digit_batches(), 16),
            progress=False).fit(1)
    assert capsys.readouterr().out.startswith("epoch 1 lr 0.1 train_loss")  # the metric line, bar or no bar


def test_accumulation_equals_one_big_batch():
    data = digit_batches(32)
    models = [tiny_cnn(dropout=0.0) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for model, batch, accumulate in ((models[0], 32, 1), (models[1], 8, 4)):
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), make_loader(data, batch),
                          accumulate=accumulate, progress=False)
        trainer.train_epoch(0)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_channels_last_clipping_logs_and_plots(tmp_path, capsys):
    model = tiny_cnn()
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), 1e-2), make_loader(digit_batches(), 16),
                      make_loader(digit_batches(seed=2), 16), precision="bf16-mixed", channels_last=True,
                      grad_clip=0.5, log_dir=str(tmp_path), progress=True)
    history = trainer.fit(2)
    assert [r["epoch"] for r in history] == [1, 2] and all(0 <= r["val_accuracy"] <= 1 for r in history)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert {"log.csv", "log.json", "loss.png", "accuracy.png", "lr.png"} <= set(os.listdir(tmp_path))
    assert "epoch 2 lr" in capsys.readouterr().out
    with open(tmp_path / "log.csv") as file:
        assert file.readline().startswith("epoch,lr,train_loss,train_accuracy")


def test_bad_trainer_arguments_are_named():
    model = tiny_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad, match in (({"precision": "fp16"}, "precision"), ({"accumulate": 0}, "accumulate"),
                       ({"grad_clip": -1.0}, "grad_clip"), ({"scheduler_interval": "batch"}, "scheduler_interval")):
        with pytest.raises(ValueError, match=match):
            Trainer(model, optimizer, [], **bad)


def test_segmentation_metrics_report_miou():
    confusion = torch.tensor([[3.0, 1.0], [0.0, 2.0]])  # rows: target, columns: prediction
    assert mean_iou(confusion) == pytest.approx((3 / 4 + 2 / 3) / 2)
    metrics = EpochMetrics(num_classes=2)
    targets = torch.tensor([[[0, 0], [0, 0], [1, 1]]]).reshape(1, 2, 3)
    logits = nn.functional.one_hot(torch.tensor([[0, 0, 0, 1, 1, 1]]).reshape(1, 2, 3), 2).permute(0, 3, 1, 2)
    metrics.update(torch.tensor(0.5), logits.float(), targets)
    result = metrics.compute()
    assert result["accuracy"] == pytest.approx(5 / 6) and result["miou"] == pytest.approx((3 / 4 + 2 / 3) / 2)


def test_segmentation_batches_of_image_mask_label_report_miou():
    from fastcnn.data.segmentation import SyntheticShapes

    data = SyntheticShapes(16, size=12, channels=1)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, data.num_seg_classes, 1))
    seen = []

    def mask_loss(logits, mask, label):
        seen.append(label.shape)
        return nn.functional.cross_entropy(logits, mask)

    trainer = Trainer(model, torch.optim.Adam(model.parameters(), 1e-2), make_loader(data, 8), make_loader(data, 8),
                      loss_fn=mask_loss, num_classes=data.num_seg_classes, progress=False)
    record = trainer.fit(2)[-1]
    assert 0.0 <= record["val_miou"] <= 1.0 and 0.0 <= record["train_accuracy"] <= 1.0
    assert seen[0] == (8,)
