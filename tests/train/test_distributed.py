"""Two gloo processes on the CPU: DDP equals single-process training on the combined batch (BN-free model) and
leaves equal parameters on both ranks; SyncBatchNorm2d equals BatchNorm2d on the combined batch, forward and
backward; validation over unpadded shards counts every item exactly once, with rank 0's BatchNorm buffers on every rank;
fused VGG-BN converted to SyncBatchNorm2d trains exactly as stock converted."""
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from _ddp_worker import COMBINED_BATCH, STEPS, run
from _models import digit_batches, tiny_cnn

from fastcnn.train.distributed import ShardSampler
from fastcnn.train.sync_batchnorm import SyncBatchNorm2d, convert_sync_batchnorm

WORLD = 2


def _single_process_training():
    torch.manual_seed(0)
    model = tiny_cnn(dropout=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, labels = digit_batches(STEPS * COMBINED_BATCH).tensors
    for step in range(STEPS):
        batch = slice(step * COMBINED_BATCH, (step + 1) * COMBINED_BATCH)
        nn.functional.cross_entropy(model(images[batch]), labels[batch]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return dict(model.named_parameters())


def test_two_gloo_processes(tmp_path):
    inputs = torch.randn(6, 3, 5, 4, dtype=torch.float64) * 3 + 1
    grads = torch.randn(6, 3, 5, 4, dtype=torch.float64)
    mp.spawn(run, args=(WORLD, str(tmp_path / "store"), str(tmp_path), inputs, grads), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    single = _single_process_training()
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
        torch.testing.assert_close(value, single[name].detach(), msg=name)

    norm = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        norm.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
    x = inputs.clone().requires_grad_(True)
    output = norm(x)
    output.backward(grads)
    bn = [rank["bn"] for rank in ranks]
    torch.testing.assert_close(torch.cat([b["output"] for b in bn]), output.detach())
    # Each rank's gradients are those of the sum of all ranks' losses (here grads · output over the combined batch).
    torch.testing.assert_close(torch.cat([b["input_grad"] for b in bn]), x.grad)
    torch.testing.assert_close(sum(b["weight_grad"] for b in bn), norm.weight.grad)
    torch.testing.assert_close(sum(b["bias_grad"] for b in bn), norm.bias.grad)
    for b in bn:
        torch.testing.assert_close(b["running_mean"], norm.running_mean)
        torch.testing.assert_close(b["running_var"], norm.running_var)

    buffers = [rank["validation_buffers"] for rank in ranks]
    assert any(not torch.equal(buffers[0]["before"][k], buffers[1]["before"][k]) for k in buffers[0]["before"])
    for rank in buffers:
        for name, value in rank["after"].items():
            assert torch.equal(value, buffers[0]["before"][name]), name  # rank 0's: the saved model's
    assert buffers[0]["metrics"] == buffers[1]["metrics"]

    for rank in ranks:
        fused, stock = rank["fused_sync_batchnorm"][True], rank["fused_sync_batchnorm"][False]
        torch.testing.assert_close(fused["output"], stock["output"])
        for name in ("grads", "buffers"):
            assert fused[name].keys() == stock[name].keys()
            for key, value in stock[name].items():
                torch.testing.assert_close(fused[name][key], value, msg=key)

    whole = _validate_single_process()
    for rank in ranks:
        assert rank["validation"]["samples"] == 13
        assert rank["validation"]["accuracy"] == whole["accuracy"]
        assert abs(rank["validation"]["loss"] - whole["loss"]) < 1e-6


def _validate_single_process():
    from fastcnn.train import Trainer

    torch.manual_seed(0)
    model = tiny_cnn(dropout=0.0)
    loader = torch.utils.data.DataLoader(digit_batches(13, seed=3), batch_size=4)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), [], loader, progress=False).validate()


def test_shard_sampler_covers_each_item_once_and_conversion_keeps_the_state():
    shards = [list(ShardSampler(range(13), 3, rank)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(13)) and [len(s) for s in shards] == [5, 4, 4]
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    model(torch.randn(2, 3, 6, 6))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_batchnorm(model)
    assert isinstance(converted[1], SyncBatchNorm2d)
    assert state.keys() == converted.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in converted.state_dict().items())
    converted.eval()
    assert converted(torch.ones(1, 3, 6, 6)).shape == (1, 4, 4, 4)  # eval without a process group: plain BN
