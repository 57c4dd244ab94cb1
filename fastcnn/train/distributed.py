"""Distributed data parallel training launched by ``torchrun``: process-group set-up (gloo on CPU, NCCL on GPU), the
samplers (a DistributedSampler for training, an unpadded shard sampler for exact validation) and the DDP wrapper.

Nothing is replaced behind the user's back: the helpers return samplers and loaders that the user passes to the
Trainer, which calls ``set_epoch`` on a train sampler that has it and sums validation counts over processes.
"""
import os

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from fastcnn.data import make_loader


def init_distributed(backend=None):
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Args:
        backend (str or None): ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is present, else gloo.

    Returns:
        (rank, world_size, device): the device is ``cuda:LOCAL_RANK`` with NCCL, else ``cpu``.

    Example:
        >>> rank, world, device = init_distributed()     # torchrun --nproc-per-node=2 train.py
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("init_distributed: RANK/WORLD_SIZE are not set; launch with torchrun")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), device


class ShardSampler(Sampler):
    """Rank r of w takes items r, r + w, r + 2w, ...: disjoint shards covering the dataset exactly once, with no
    padding (DistributedSampler repeats items so that every rank has as many, which biases validation metrics).
    Shards differ in length by at most one; only use this where processes need not run equal numbers of steps
    (the Trainer validates on the unwrapped model, with no collective inside the loop).
    """

    def __init__(self, dataset, num_replicas=None, rank=None):
        self.length = len(dataset)
        self.num_replicas = num_replicas if num_replicas is not None else dist.get_world_size()
        self.rank = rank if rank is not None else dist.get_rank()
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {self.rank}")

    def __iter__(self):
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self):
        return len(range(self.rank, self.length, self.num_replicas))


def distributed_loaders(train, val, batch_size, *, seed=0, drop_last=False, num_workers=0, device="cpu"):
    """(train_loader, val_loader) for this process: a shuffling DistributedSampler (``batch_size`` per process;
    the Trainer calls its ``set_epoch``) and an unpadded :class:`ShardSampler` for validation."""
    train_sampler = DistributedSampler(train, shuffle=True, seed=seed, drop_last=drop_last)
    train_loader = make_loader(train, batch_size, sampler=train_sampler, drop_last=drop_last,
                               num_workers=num_workers, device=device)
    val_loader = make_loader(val, batch_size, sampler=ShardSampler(val), num_workers=num_workers, device=device)
    return train_loader, val_loader


def wrap_ddp(model, device):
    """``DistributedDataParallel(model)`` on ``device`` (``device_ids`` only for a CUDA device, as DDP requires)."""
    device = torch.device(device)
    model.to(device)
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def broadcast_buffers(module, src=0):
    """Give every process ``src``'s buffers (BatchNorm running statistics), in place; nothing when not distributed.

    DDP broadcasts process 0's buffers at the start of each training forward, so after the epoch's last forward each
    process holds running statistics updated from its own last batch. The checkpoint is process 0's model: every
    process validates with process 0's buffers, so the reported metrics are the saved model's.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src)
