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
# Contexts open in any thread, by name: while none is, the per-thread depth need not be read. Both checks run at the
# top of every fused module's forward, where with the caches evicted (as between a network's layers) reading the
# thread-local state cost 8-9 us and reading this count ~1 us.
_open = {"unfused": 0, "stock_slots": 0}
_open_lock = threading.Lock()


def _depth(name):
    return getattr(_state, name, 0)


@contextlib.contextmanager
def _raised(name):
    with _open_lock:
        _open[name] += 1
    setattr(_state, name, _depth(name) + 1)
    try:
        yield
    finally:
        setattr(_state, name, _depth(name) - 1)
        with _open_lock:
            _open[name] -= 1


def unfused():
    """Context manager: fused modules run their stock computation (see the module docstring)."""
    return _raised("unfused")


def is_unfused():
    """True inside an ``unfused()`` context (in this thread)."""
    return _open["unfused"] > 0 and _depth("unfused") > 0


def stock_slots():
    """Context manager used by ``FusedSequential``: each module of a fused run computes only the stock layer of its
    own slot (the fused conv its convolution, the placeholders their ReLU or pool). Outside a FusedSequential the
    slots of a run have no neighbours to finish the computation, so only the sequence sets this."""
    return _raised("stock_slots")


def in_stock_slot():
    """True while a ``FusedSequential`` runs its fused runs slot by slot (in this thread)."""
    return _open["stock_slots"] > 0 and _depth("stock_slots") > 0
