"""Whether Triton's interpreter (TRITON_INTERPRET=1) can run fastcnn's kernels with the numpy installed here.

Every fastcnn kernel loops over a runtime argument (``for t in range(CHUNK_TILES)``). Triton 3.6's interpreter holds
a scalar argument as a shape-(1,) numpy array and turns it into a Python int with ``int(array)``, which numpy 2.4
refuses ("only 0-dimensional arrays can be converted to Python scalars"); Triton 3.8 squeezes the array first. With
that pair no interpreted kernel runs, so tests/conftest.py skips the interpreted Triton tests, saying why, instead
of failing each one on the same environment problem.
"""
import triton
import triton.language as tl


@triton.jit
def _count_kernel(out_ptr, n):
    total = 0
    for _ in range(n):
        total += 1
    tl.store(out_ptr, total)


def interpreter_problem():
    """None when the interpreter runs a kernel whose loop bound is a runtime argument, else why it cannot."""
    import numpy
    import torch

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count_kernel[(1,)](out, 3)
    except Exception as error:  # the interpreter wraps the numpy TypeError in its own InterpreterError
        return (f"Triton {triton.__version__}'s interpreter cannot run kernels with runtime loop bounds under numpy "
                f"{numpy.__version__} ({error}); use numpy<2.4 or Triton>=3.8")
    if out.item() != 3:
        return f"Triton {triton.__version__}'s interpreter ran a 3-iteration loop {out.item()} times"
    return None
