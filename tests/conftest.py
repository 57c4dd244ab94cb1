"""Test set-up: Triton's interpreter on GPU-less machines, the `cuda` marker, seeds and the Hypothesis profile."""
import importlib.util
import os

import torch

# Without a GPU, Triton kernels run under the interpreter on CPU tensors. This must be set before triton (and
# fastcnn, which records it) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

try:
    from hypothesis import settings
except ImportError:  # e.g. on the offline GPU machine; the Hypothesis tests then skip themselves
    settings = None
if settings is not None:
    settings.register_profile("ci", derandomize=True, max_examples=30, deadline=None, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _skip_interpreted_triton_tests(items):
    """Under TRITON_INTERPRET=1, skips the Triton tests (ids naming triton) when the interpreter cannot run fastcnn's
    kernels with this Triton and numpy (tests/_triton_interpreter.py says when and why)."""
    triton_items = [item for item in items if "triton" in item.nodeid]
    if not triton_items or os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return
    from _triton_interpreter import interpreter_problem

    problem = interpreter_problem()
    if problem is not None:
        for item in triton_items:
            item.add_marker(pytest.mark.skip(reason=problem))


def pytest_collection_modifyitems(config, items):
    _skip_interpreted_triton_tests(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fastcnn_paths_run(request):
    """fastcnn's own kernels and fused modules run in every test - their agreement with stock is what the tests
    check - also where a route table sends a call to stock PyTorch for speed (small convolutions, the float32
    residual and Inception blocks on CPU); the tests of that routing are marked ``stock_routes`` and see the routes
    as users do."""
    if request.node.get_closest_marker("stock_routes"):
        yield
        return
    from fastcnn.ops import skip_stock_routes

    with skip_stock_routes():
        yield


@pytest.fixture
def one_intra_op_thread():
    """Runs a test with one intra-op thread: for tiny tensors extra threads cost more in synchronisation than they
    compute, badly so on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
