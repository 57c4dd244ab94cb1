"""The model-zoo tests run whole networks on tiny inputs: one intra-op thread each (measured 10x faster than two
on this busy 2-core machine, where the threads of concurrent processes oversubscribe the cores)."""
import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_intra_op_thread):
    yield
