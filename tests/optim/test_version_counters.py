"""fastcnn's in-place ops increment the version counters of the tensors they write, as torch's own in-place ops and
fused optimizers do: autograd's "modified by an inplace operation" check and anything keyed on versions see them."""
import pytest
import torch
from _lockstep import backend_params

import fastcnn
from fastcnn.ops.channel_slice import scale_shift_relu_out
from fastcnn.optim._fused import lr_arguments

OPTIMIZERS = {
    "adam_": lambda params: fastcnn.optim.Adam(params, lr=1e-2, amsgrad=True),
    "sgd_": lambda params: fastcnn.optim.SGD(params, lr=0.1, momentum=0.9),
    "adagrad_": lambda params: fastcnn.optim.Adagrad(params, lr=0.1),
    "lars_": lambda params: fastcnn.optim.LARS(params, lr=0.1, momentum=0.9),
}
CASES = [pytest.param(op, backend.values[0], id=f"{op}-{backend.id}")
         for op in OPTIMIZERS for backend in backend_params(op)]


def _state_tensors(optimizer, param):
    return [t for t in optimizer.state[param].values() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("op, backend", CASES)
def test_optimizer_step_increments_versions_of_params_and_state(op, backend):
    params = [torch.nn.Parameter(torch.randn(7, 3)), torch.nn.Parameter(torch.randn(5))]
    optimizer = OPTIMIZERS[op](params)
    for p in params:
        p.grad = torch.randn_like(p)
    with fastcnn.use_backend(backend):
        optimizer.step()  # creates the state
        before = [(p._version, [t._version for t in _state_tensors(optimizer, p)]) for p in params]
        optimizer.step()
    for p, (version, state_versions) in zip(params, before):
        assert p._version > version
        assert all(t._version > v for t, v in zip(_state_tensors(optimizer, p), state_versions))


@pytest.mark.parametrize("op, backend", CASES)
def test_autograd_sees_a_step_on_a_saved_parameter(op, backend):
    weight = torch.nn.Parameter(torch.randn(4))
    loss = (weight * weight).sum()  # saves weight for backward
    optimizer = OPTIMIZERS[op]([weight])
    weight.grad = torch.ones_like(weight)
    with fastcnn.use_backend(backend):
        optimizer.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_store_into_a_channel_slice_increments_the_output_version():
    out = torch.zeros(2, 5, 3, 3)
    version = out._version
    scale_shift_relu_out(torch.randn(2, 2, 3, 3), None, torch.zeros(2), out.narrow(1, 1, 2))
    assert out._version > version


def test_a_float32_lr_tensor_on_the_params_device_is_passed_without_a_copy():
    lr = torch.tensor([0.5])
    assert lr_arguments(lr, torch.device("cpu"))[1].data_ptr() == lr.data_ptr()
    assert lr_arguments(lr.double(), torch.device("cpu"))[1].dtype == torch.float32
