"""fastcnn and torchvision residual blocks sharing one random state_dict, for the block tests."""
import copy

import torch
import torch.nn as nn


def make_pair(ours, theirs, kwargs):
    """(fastcnn block, torchvision block) with one random state_dict, running statistics included."""
    kwargs = dict(kwargs)
    out_channels = kwargs["planes"] * theirs.expansion
    if kwargs.get("stride", 1) != 1 or kwargs["inplanes"] != out_channels:
        kwargs["downsample"] = nn.Sequential(nn.Conv2d(kwargs["inplanes"], out_channels, 1, kwargs.get("stride", 1),
                                                       bias=False), nn.BatchNorm2d(out_channels))
    stock = theirs(**kwargs)
    with torch.no_grad():
        for name, buffer in stock.named_buffers():
            if "running" in name:
                buffer.copy_(torch.rand_like(buffer) + 0.5 if "var" in name else torch.randn_like(buffer))
        for name, param in stock.named_parameters():
            if "bn" in name or "downsample.1" in name:
                param.copy_(torch.randn_like(param))
    block = ours(**{**kwargs, "downsample": copy.deepcopy(kwargs.get("downsample"))})
    block.load_state_dict(stock.state_dict())
    return block, stock
