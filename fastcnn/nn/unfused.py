"""``fastcnn.nn.unfused()``: run every fused fastcnn module as the stock modules in its place would run.

Inside the context a fused module computes exactly what the stock modules it replaces compute, calling the modules
that hold each stock layer, so forward hooks on any layer a user names (Grad-CAM, feature extraction) fire with the
same tensors as on the stock model:

* residual and Inception blocks run their stock forward, which calls ``conv1``, ``bn1``, ... in turn;
* a fused ``Conv2d [-> BatchNorm2d] -> ReLU [-> pool]`` run inside a ``FusedSequential`` runs slot by slot: the fused
  conv at the conv's slot returns the convolution's output, the ``FusedBatchNorm2d`` in the next slot applies the
  BatchNorm, and the placeholders in the ReLU's and the pool's slots apply the ReLU and the pool.

Outputs are the stock model's, so they are those of the fused model up to rounding. The flag is per thread.

Example:
    >>> with fastcnn.nn.unfused():
    ...     logits = model(images)   # hooks on model.layer4[1].conv2 fire, as on torchvision's resnet18
"""
import contextlib
import threading

_state = threading.local()


def _depth(name):
    return getattr(_state, name, 0)


@contextlib.contextmanager
def _raised(name):
    setattr(_state, name, _depth(name) + 1)
    try:
        yield
    finally:
        setattr(_state, name, _depth(name) - 1)


def unfused():
    """Context manager: fused modules run their stock computation (see the module docstring)."""
    return _raised("unfused")


def is_unfused():
    """True inside an ``unfused()`` context (in this thread)."""
    return _depth("unfused") > 0


def stock_slots():
    """Context manager used by ``FusedSequential``: each module of a fused run computes only the stock layer of its
    own slot (the fused conv its convolution, the placeholders their ReLU or pool). Outside a FusedSequential the
    slots of a run have no neighbours to finish the computation, so only the sequence sets this."""
    return _raised("stock_slots")


def in_stock_slot():
    """True while a ``FusedSequential`` runs its fused runs slot by slot (in this thread)."""
    return _depth("stock_slots") > 0
