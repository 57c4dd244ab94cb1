"""CAM and Grad-CAM: the exact identity for GAP + linear heads, in-place ReLU after the hooked layer, hook removal,
and the PNG overlay."""
import pytest
import torch
import torch.nn as nn

from fastcnn.train.cam import GradCAM, cam, explain_to_png, overlay


class GapNet(nn.Module):
    """conv -> in-place ReLU -> conv -> in-place ReLU -> GAP -> linear (ResNet's head in miniature)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def test_grad_cam_at_the_last_feature_map_equals_cam():
    model = GapNet().double().eval()
    images = torch.randn(3, 3, 9, 11, dtype=torch.float64)
    with GradCAM(model, [model.features]) as grad_cam:
        maps = grad_cam(images)
    expected = cam(model, images, model.features, model.fc)
    assert maps.shape == (3, 9, 11) and maps.min() >= 0 and maps.max() <= 1
    torch.testing.assert_close(maps, expected.to(maps.dtype), rtol=0, atol=1e-12)
    fixed = cam(model, images, model.features, model.fc, targets=2)
    with GradCAM(model, model.features) as grad_cam:
        torch.testing.assert_close(grad_cam(images, targets=2), fixed.to(torch.float64), rtol=0, atol=1e-12)


def test_hooking_a_conv_followed_by_inplace_relu_and_removing_hooks():
    model = GapNet().eval()
    conv = model.features[2]
    with GradCAM(model, [conv]) as grad_cam:
        maps = grad_cam(torch.randn(2, 3, 8, 8))
        assert conv._forward_hooks
    assert not conv._forward_hooks and torch.isfinite(maps).all()
    with pytest.raises(TypeError, match="target_layers"):
        GradCAM(model, [])


def test_overlay_and_png(tmp_path):
    model = GapNet().eval()
    image = torch.randn(3, 16, 16)
    blended = overlay(image[:1], torch.rand(16, 16))
    assert blended.shape == (16, 16, 3) and 0 <= blended.min() and blended.max() <= 1
    path = tmp_path / "cam.png"
    target = explain_to_png(model, image, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 0 <= target < 5
    with pytest.raises(ValueError, match="layer 'nope'"):
        explain_to_png(model, image, str(path), layer="nope")
