"""The body of each process of the 2-process gloo test (tests/train/test_distributed.py); results go to files."""
import os

import torch
import torch.distributed as dist
from _models import digit_batches, tiny_cnn

from fastcnn.models import get_model
from fastcnn.train import Trainer
from fastcnn.train.distributed import ShardSampler, wrap_ddp
from fastcnn.train.sync_batchnorm import SyncBatchNorm2d, convert_sync_batchnorm

STEPS, COMBINED_BATCH = 3, 16


def bn_free_training(rank, world):
    """DDP SGD steps, each rank on its half of each combined batch."""
    torch.manual_seed(0)
    model = wrap_ddp(tiny_cnn(dropout=0.0), "cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = digit_batches(STEPS * COMBINED_BATCH)
    half = COMBINED_BATCH // world
    for step in range(STEPS):
        start = step * COMBINED_BATCH + rank * half
        images, labels = data.tensors[0][start:start + half], data.tensors[1][start:start + half]
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {name: p.detach().clone() for name, p in model.module.named_parameters()}


def sync_batchnorm(rank, world, inputs, grads):
    norm = SyncBatchNorm2d(inputs.shape[1], dtype=torch.float64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        norm.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
    half = inputs.shape[0] // world
    x = inputs[rank * half:(rank + 1) * half].clone().requires_grad_(True)
    output = norm(x)
    output.backward(grads[rank * half:(rank + 1) * half])
    return {"output": output.detach(), "input_grad": x.grad, "weight_grad": norm.weight.grad,
            "bias_grad": norm.bias.grad, "running_mean": norm.running_mean, "running_var": norm.running_var}


def exact_validation():
    torch.manual_seed(0)
    model = tiny_cnn(dropout=0.0)
    val = digit_batches(13, seed=3)  # 13 items over 2 ranks: 7 + 6, none repeated
    loader = torch.utils.data.DataLoader(val, batch_size=4, sampler=ShardSampler(val))
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), [], loader, progress=False).validate()


def validation_buffers(rank):
    """A BatchNorm model whose running statistics differ per rank (as after DDP's last training forward): after
    Trainer.validate every rank holds rank 0's, the ones the saved checkpoint has."""
    torch.manual_seed(0)
    model = tiny_cnn(dropout=0.0, batch_norm=True)
    with torch.no_grad():
        model(digit_batches(8, seed=10 + rank).tensors[0])  # train mode: running statistics of this rank's batch
    before = {name: b.clone() for name, b in model.named_buffers()}
    loader = torch.utils.data.DataLoader(digit_batches(13, seed=3), batch_size=4, sampler=ShardSampler(
        digit_batches(13, seed=3)))
    metrics = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), [], loader, progress=False).validate()
    return {"before": before, "after": dict(model.named_buffers()), "metrics": metrics}


def fused_sync_batchnorm(rank, world):
    """Fused and stock vgg11_bn, both converted to SyncBatchNorm2d, one training forward + backward on this rank's
    half of a batch: the fused model must normalise with the SyncBatchNorm in its slots (statistics of the whole
    batch), as the stock model does."""
    results = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = get_model("vgg11_bn", fused=fused, width=0.125, hidden_features=16, num_classes=10)
        model = convert_sync_batchnorm(model).double()
        x = torch.randn(2 * world, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        out = model(x[rank * 2:(rank + 1) * 2])
        out.square().sum().backward()
        results[fused] = {"output": out.detach(), "grads": {n: p.grad for n, p in model.named_parameters()},
                          "buffers": dict(model.named_buffers())}
    return results


def run(rank, world, init_file, out_dir, inputs, grads):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {"params": bn_free_training(rank, world), "bn": sync_batchnorm(rank, world, inputs, grads),
                  "validation": exact_validation(), "validation_buffers": validation_buffers(rank),
                  "fused_sync_batchnorm": fused_sync_batchnorm(rank, world)}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
