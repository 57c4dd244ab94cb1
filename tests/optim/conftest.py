"""The optimizer tests step tiny tensors thousands of times: one intra-op thread each (torch's CPU fused kernels
otherwise spend more time waking their thread pool, badly so on a busy 2-core machine, than computing)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
