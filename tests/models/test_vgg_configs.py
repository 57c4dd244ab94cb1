"""The paper's configurations torchvision lacks (C, A-LRN), the LRN constants, and narrow VGGs."""
import pytest
import torch
import torch.nn as nn

from fastcnn import models
from fastcnn.models._vgg_configs import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, alexnet_lrn

from _parity import param_count, shapes, torchvision_model


def _meta_vgg(cfg, **kwargs):
    with torch.device("meta"):
        return models.vgg(cfg, **kwargs)


def test_config_c_is_d_with_three_1x1_convs():
    """C has D's keys; the last conv of blocks 3-5 (features 14, 21, 28) is 1×1, which saves 8 of 9 taps of a
    256→256 conv and two 512→512 convs (the paper's 134M vs 138M)."""
    c, d = _meta_vgg("C"), _meta_vgg("D")
    assert list(c.state_dict()) == list(d.state_dict())
    one_by_one = {f"features.{i}.weight" for i in (14, 21, 28)}
    for key, shape in shapes(c).items():
        expected = shapes(d)[key][:2] + (1, 1) if key in one_by_one else shapes(d)[key]
        assert shape == expected, key
    assert param_count(d) - param_count(c) == 8 * (256 * 256 + 2 * 512 * 512)
    for i in (14, 21, 28):
        assert c.features[i].padding == (0, 0)


@pytest.mark.parametrize("fused", [True, False])
def test_config_a_lrn_inserts_lrn_after_first_relu(fused):
    a, a_lrn = _meta_vgg("A", fused=fused), _meta_vgg("A-LRN", fused=fused)
    assert param_count(a_lrn) == param_count(a)
    assert isinstance(a_lrn.features[2], nn.LocalResponseNorm) and isinstance(a_lrn.features[3], nn.MaxPool2d)
    assert len(a_lrn.features) == len(a.features) + 1
    assert shapes(a_lrn) == {_shift_after_first_conv(key): shape for key, shape in shapes(a).items()}


def _shift_after_first_conv(key):
    """A's key -> A-LRN's: the LRN at features.2 moves every later features index up by one."""
    container, index, rest = key.split(".", 2)
    if container == "features" and int(index) > 0:
        return f"features.{int(index) + 1}.{rest}"
    return key


def _alexnet_lrn_formula(a, n=LRN_SIZE, k=LRN_K, alpha=LRN_ALPHA, beta=LRN_BETA):
    """Krizhevsky et al. (2012) §3.3: b_i = a_i / (k + α Σ_{j=max(0, i-n/2)}^{min(N-1, i+n/2)} a_j²)^β."""
    channels = a.shape[1]
    out = torch.empty_like(a)
    for i in range(channels):
        window = a[:, max(0, i - n // 2):min(channels, i + n // 2 + 1)]
        out[:, i] = a[:, i] / (k + alpha * (window ** 2).sum(1)) ** beta
    return out


def test_lrn_matches_the_alexnet_formula():
    a = torch.randn(2, 13, 5, 7, dtype=torch.float64) * 30  # large enough that the α Σ a² term matters
    torch.testing.assert_close(alexnet_lrn()(a), _alexnet_lrn_formula(a), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(_alexnet_lrn_formula(a), a / LRN_K ** LRN_BETA, rtol=1e-3)


@pytest.mark.parametrize("cfg", ["A", "A-LRN", "B", "C", "D", "E"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_every_config_runs_at_32x32(cfg, batch_norm):
    model = models.vgg(cfg, batch_norm, width=0.0625, num_classes=3)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_width_scales_channels_and_hidden_layers():
    narrow = models.vgg11(width=0.125, num_classes=10)
    assert [m.out_channels for m in narrow.features if isinstance(m, nn.Conv2d)] == [8, 16, 32, 32, 64, 64, 64, 64]
    assert narrow.classifier[0].in_features == 64 * 7 * 7 and narrow.classifier[0].out_features == 512
    assert param_count(narrow) < param_count(_meta_vgg("A")) / 50


def test_batch_norm_init():
    norms = [m for m in models.vgg11_bn(width=0.125).modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 8
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in norms)


def test_width_one_is_torchvision():
    with torch.device("meta"):
        assert shapes(models.vgg16(width=1.0)) == shapes(torchvision_model("vgg16"))


@pytest.mark.parametrize("kwargs, match", [
    ({"cfg": "F"}, "cfg must be one of"), ({"cfg": "A", "width": 0}, "width must be a positive"),
    ({"cfg": "A", "weights": "IMAGENET1K_V1"}, "weights must be None"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.vgg(**kwargs)
