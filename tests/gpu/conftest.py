"""tests/gpu: the GPU cases of every CUDA kernel, op, module and model (issue 15), self-contained."""


def pytest_configure(config):
    config.addinivalue_line("markers", "large: a case over 2^31 elements (the 64-bit index paths), several GB of GPU "
                                       "memory; scripts/gpu_check.sh runs these in proof2")
