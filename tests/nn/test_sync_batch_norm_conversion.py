"""A fused model converted to SyncBatchNorm (torch's converter or fastcnn's) computes what the stock model converted
the same way computes: its fused modules use the BatchNorm now in the model, never the one they were built with.

Single process: without a process group both SyncBatchNorms normalise over the local batch, so this checks the
wiring (which module normalises, which parameters get gradients); tests/train/test_distributed.py runs the fused
VGG-BN over two processes."""
import pytest
import torch
import torch.nn as nn
from torchvision.models.googlenet import Inception

import fastcnn
from fastcnn.models import get_model
from fastcnn.train.sync_batchnorm import convert_sync_batchnorm

CONVERTERS = {"torch": nn.SyncBatchNorm.convert_sync_batchnorm, "fastcnn": convert_sync_batchnorm}


def _zoo(name, **kwargs):
    def build(fused):
        torch.manual_seed(0)
        return get_model(name, fused=fused, num_classes=10, **kwargs)
    return build, (4, 3, 32, 32)


def _inception(fused):
    torch.manual_seed(0)
    return fastcnn.nn.InceptionBlock(16, 8, 6, 10, 4, 6, 6) if fused else Inception(16, 8, 6, 10, 4, 6, 6)


MODELS = {
    "resnet18": _zoo("resnet18"),
    "vgg11_bn": _zoo("vgg11_bn", width=0.25, hidden_features=32),
    "inception": (_inception, (4, 16, 9, 11)),
}


@pytest.mark.parametrize("converter", list(CONVERTERS))
@pytest.mark.parametrize("name", list(MODELS))
def test_converted_fused_model_trains_and_evaluates_as_converted_stock(name, converter):
    build, shape = MODELS[name]
    fused, stock = (CONVERTERS[converter](build(f)).double() for f in (True, False))
    fused.load_state_dict(stock.state_dict())
    assert not any(type(m) in (nn.BatchNorm2d, fastcnn.nn.FusedBatchNorm2d) for m in fused.modules())
    x = torch.randn(shape, dtype=torch.float64)
    for train in (True, False):
        outputs = []
        for model in (fused, stock):
            model.train(train).zero_grad()
            torch.manual_seed(1)  # the same dropout masks
            out = model(x)
            out.square().sum().backward()
            outputs.append(out)
        torch.testing.assert_close(outputs[0], outputs[1], msg=f"output, train={train}")
        stock_grads = dict(stock.named_parameters())
        for key, p in fused.named_parameters():  # the SyncBatchNorms' gamma and beta are trained
            torch.testing.assert_close(p.grad, stock_grads[key].grad, msg=f"{key}.grad, train={train}")
        for key, buffer in stock.named_buffers():
            torch.testing.assert_close(fused.get_buffer(key), buffer, msg=key)
