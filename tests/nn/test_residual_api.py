"""fastcnn.nn.BasicBlock / Bottleneck are drop-in for torchvision's blocks: constructor, attributes, init, keys."""
import pytest
import torch
import torch.nn as nn
from torchvision.models import resnet as tv

import fastcnn

PAIRS = [(fastcnn.nn.BasicBlock, tv.BasicBlock), (fastcnn.nn.Bottleneck, tv.Bottleneck)]


def _downsample(inplanes, outplanes, stride):
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), nn.BatchNorm2d(outplanes))


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=["basic", "bottleneck"])
@pytest.mark.parametrize("fused", [True, False])
def test_same_init_attributes_and_state_dict_keys(ours, theirs, fused):
    torch.manual_seed(3)
    stock = theirs(16, 8, 2, _downsample(16, 8 * theirs.expansion, 2))
    torch.manual_seed(3)
    block = ours(16, 8, 2, _downsample(16, 8 * ours.expansion, 2), fused=fused)
    assert ours.expansion == theirs.expansion
    assert block.stride == 2 and block.fused is fused
    assert list(block.state_dict()) == list(stock.state_dict())
    for key, value in stock.state_dict().items():
        torch.testing.assert_close(block.state_dict()[key], value, atol=0, rtol=0, msg=key)
    assert [name for name, _ in block.named_children()] == [name for name, _ in stock.named_children()]
    stock.load_state_dict(block.state_dict(), strict=True)


def test_bottleneck_width_follows_groups_and_base_width():
    block, stock = fastcnn.nn.Bottleneck(64, 16, groups=4, base_width=8), tv.Bottleneck(64, 16, groups=4, base_width=8)
    assert block.conv2.weight.shape == stock.conv2.weight.shape and block.conv2.groups == 4


@pytest.mark.parametrize("kwargs, error", [
    (dict(groups=2), ValueError), (dict(base_width=32), ValueError), (dict(dilation=2), NotImplementedError)])
def test_basic_block_rejects_what_torchvision_rejects(kwargs, error):
    with pytest.raises(error, match="BasicBlock"):
        fastcnn.nn.BasicBlock(8, 8, **kwargs)
    with pytest.raises(error, match="BasicBlock"):
        tv.BasicBlock(8, 8, **kwargs)


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=["basic", "bottleneck"])
def test_custom_norm_layer_is_used(ours, theirs):
    def norm(channels):
        return nn.GroupNorm(2, channels)
    block, stock = ours(16, 4 * 4 // ours.expansion, norm_layer=norm), theirs(16, 4 * 4 // theirs.expansion,
                                                                             norm_layer=norm)
    block.load_state_dict(stock.state_dict())
    x = torch.randn(2, 16, 5, 7)
    torch.testing.assert_close(block(x), stock(x))
