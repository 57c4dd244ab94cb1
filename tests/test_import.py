"""Importing fastcnn never fails for want of its compiled extension: one warning, then the next backend."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import fastcnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, fastcnn
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    out = fastcnn.functional.conv2d_relu_pool(x, w)
    expected = torch.max_pool2d(torch.relu(torch.conv2d(x, w)), 2)
assert fastcnn.__file__.startswith({where!r}), fastcnn.__file__
assert not fastcnn._extension.LOADED
assert torch.equal(out, expected)
messages = [str(c.message) for c in caught if "fastcnn" in str(c.message)]
assert len(messages) == 1, messages
print(messages[0])
"""


def _copy_package(tmp_path, with_extension, build_info=None):
    """A copy of the fastcnn package in tmp_path, optionally without its compiled extension."""
    target = tmp_path / "fastcnn"
    skip = shutil.ignore_patterns("__pycache__", "*.so", "_build_info.json")
    shutil.copytree(os.path.join(ROOT, "fastcnn"), target, ignore=skip)
    shutil.copytree(os.path.join(ROOT, "triton_kernels"), target / "triton_kernels", ignore=skip)
    if with_extension:
        for name in os.listdir(os.path.dirname(fastcnn.__file__)):
            if name.startswith("_C") and name.endswith(".so"):
                shutil.copy(os.path.join(os.path.dirname(fastcnn.__file__), name), target / name)
    if build_info is not None:
        (target / "_build_info.json").write_text(json.dumps(build_info))
    return str(target)


def _import_in_subprocess(tmp_path, where):
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("FASTCNN_QUIET", None)
    result = subprocess.run([sys.executable, "-c", PROBE.format(where=where)], capture_output=True, text=True,
                            env=env, cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_without_extension_warns_once_and_falls_back(tmp_path):
    where = _copy_package(tmp_path, with_extension=False)
    assert "is not built" in _import_in_subprocess(tmp_path, where)


@pytest.mark.skipif(not fastcnn._extension.LOADED, reason="needs a built fastcnn._C to mismatch")
def test_import_with_mismatched_extension_warns_once_and_falls_back(tmp_path):
    info = dict(fastcnn._extension.build_info(), torch="1.0.0")
    where = _copy_package(tmp_path, with_extension=True, build_info=info)
    assert "built for torch 1.0.0" in _import_in_subprocess(tmp_path, where)


def test_info_reports_every_backend():
    from fastcnn.info import report

    text = report()
    for backend in fastcnn.BACKENDS:
        assert f" {backend} " in text
    assert "fastcnn._C:" in text and "conv2d_relu_pool" in text
