"""Shared helpers of the model-zoo tests: torchvision models and their fastcnn twins holding the same weights, and
the forward/backward comparison of the two against a float64 oracle (the torchvision model in float64).

A seeded torchvision state_dict is built once per model and every model of a test is made on the meta device and
given copies of those tensors.

Inputs are sized so that the comparison is well-conditioned on any CPU. A train-mode BatchNorm normalises each
channel over the N*H*W values of its batch; over few values it is ill-conditioned - over 2 (resnet18's layer4 at
32 px, batch 2: 1x1 maps) ``(x - mean) / std`` is +-1 whatever x is, and rounding decides the gradient - so stock's
own error against the float64 oracle swings with oneDNN's kernel choice (resnet18, batch 2 at 32 px: stock's
gradients up to 2e-2 off float64 on AVX-512, 1.7e-1 with ONEDNN_MAX_CPU_ISA=AVX2), and "2x stock's error" passed or
failed with the CPU (fused output 2.45e-3 off, allowed 1.05e-3 on AVX-512; a pass under AVX2). With at least
MIN_BATCH_NORM_VALUES values per channel stock's error sits at the float32 floor under both ISAs (resnet18, batch 4
at 64 px: 6e-6 and 9e-6; the fused model uses at most 0.31 of its allowance); `assert_step_parity` enforces it.
"""
import contextlib
import functools

import torch
import torchvision

from fastcnn import models

from _tolerances import assert_close_to_oracle


def torchvision_model(name, **kwargs):
    return getattr(torchvision.models, name)(weights=None, **kwargs)


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def shapes(model):
    return {key: tuple(t.shape) for key, t in model.state_dict().items()}


# VGG parity runs with the classifier narrowed to this many hidden features in both models (torchvision's is 4096
# wide: 120M weights whose gradients would dominate the test's time, and which fastcnn does not change).
VGG_TEST_HIDDEN = 64
_VGG_CONFIGS = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}


def torchvision_for_parity(name, num_classes):
    """``torchvision.models.<name>``; for a VGG, with the classifier's hidden layers ``VGG_TEST_HIDDEN`` wide."""
    if not name.startswith("vgg"):
        return torchvision_model(name, num_classes=num_classes)
    with torch.device("meta"):  # the 4096-wide classifier is replaced below: build it without memory or init
        model = torchvision_model(name, num_classes=num_classes)
    cfg = torchvision.models.vgg.cfgs[_VGG_CONFIGS[name.removesuffix("_bn")]]
    model.features = torchvision.models.vgg.make_layers(cfg, batch_norm=name.endswith("_bn"))
    hidden, pooled = VGG_TEST_HIDDEN, model.classifier[0].in_features
    model.classifier = torch.nn.Sequential(
        torch.nn.Linear(pooled, hidden), torch.nn.ReLU(True), torch.nn.Dropout(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(True), torch.nn.Dropout(), torch.nn.Linear(hidden, num_classes))
    return model


def fastcnn_for_parity(name, num_classes, fused):
    """``fastcnn.models.<name>``, shaped as ``torchvision_for_parity``'s model."""
    narrow_head = {"hidden_features": VGG_TEST_HIDDEN} if name.startswith("vgg") else {}
    return models.get_model(name, num_classes=num_classes, fused=fused, **narrow_head)


MIN_BATCH_NORM_VALUES = 16

# (batch, image size) of the training-mode parity inputs: the deepest BatchNorm sees batch * (size / 16)^2 values
# per channel in VGG (2x2 maps at 32 px), batch * (size / 32)^2 in ResNet (layer4). Eval mode uses the running
# statistics, an affine map at any size: EVAL_INPUT.
TRAIN_INPUT = {"vgg11": (2, 32), "vgg11_bn": (4, 32), "resnet18": (4, 64), "resnet50": (4, 64)}
EVAL_INPUT = (2, 32)


def parity_input_shape(name, train):
    """(batch, size) of the parity input of model ``name`` in training (``train``) or eval mode."""
    return TRAIN_INPUT[name] if train else EVAL_INPUT


@contextlib.contextmanager
def batch_norm_sizes(model):
    """Collects, for each train-mode BatchNorm forward of ``model`` inside the context, the number of values per
    channel it normalises (N*H*W)."""
    sizes = []
    hooks = [module.register_forward_pre_hook(lambda m, args: sizes.append(args[0].numel() // args[0].shape[1]))
             for module in model.modules()
             if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training]
    try:
        yield sizes
    finally:
        for hook in hooks:
            hook.remove()


@functools.lru_cache(maxsize=4)  # the four models of the parity tests
def seeded_torchvision_state(name, num_classes, seed=0):
    """The state_dict of ``torchvision_for_parity(name, num_classes)`` built after ``torch.manual_seed(seed)``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torchvision_for_parity(name, num_classes).state_dict()


def with_state(build, state, dtype=torch.float32):
    """``build()`` on the meta device, then given its own ``dtype`` copies of ``state``'s tensors."""
    with torch.device("meta"):
        model = build()
    copies = {k: v.to(dtype, copy=True) if v.is_floating_point() else v.clone() for k, v in state.items()}
    model.load_state_dict(copies, strict=True, assign=True)
    return model


def parity_twins(name, num_classes, fused, dtype=torch.float32):
    """(fastcnn model, torchvision model, torchvision model in float64), all with the same seeded weights."""
    state = seeded_torchvision_state(name, num_classes)
    return (with_state(lambda: fastcnn_for_parity(name, num_classes, fused), state, dtype),
            with_state(lambda: torchvision_for_parity(name, num_classes), state, dtype),
            with_state(lambda: torchvision_for_parity(name, num_classes), state, torch.float64))


def run_step(model, x, seed):
    """Output, input gradient, parameter gradients and buffers after one forward/backward of ``model`` on ``x``.
    The seed fixes the dropout masks, which are the same in every dtype for the same seed."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    # A fixed cotangent (a loss with small integer weights) so that gradients compare across dtypes.
    weights = torch.arange(out.numel(), dtype=torch.float64).remainder(5).sub(2).reshape(out.shape)
    (out * weights.to(out.dtype)).sum().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return out.detach(), x.grad, grads, dict(model.named_buffers())


def assert_step_parity(fastcnn_model, stock_model, oracle_model, x, train):
    """fastcnn's forward and backward (output, every gradient, BatchNorm's running statistics) against torchvision's
    at the same dtype, both checked against the float64 oracle with the suite's tolerance rule."""
    for model in (fastcnn_model, stock_model, oracle_model):
        model.train(train)
    dtype = next(stock_model.parameters()).dtype
    result, stock = run_step(fastcnn_model, x.to(dtype), seed=0), run_step(stock_model, x.to(dtype), seed=0)
    with batch_norm_sizes(oracle_model) as sizes:
        oracle = run_step(oracle_model, x.double(), seed=0)
    # Not for float64 comparisons: even the 2-value BatchNorm's ~2e4-fold amplification of rounding (2.45e-3 in
    # float32) leaves float64 results ~4e-12 off, under the 1e-10 floor.
    assert dtype == torch.float64 or min(sizes, default=MIN_BATCH_NORM_VALUES) >= MIN_BATCH_NORM_VALUES, \
        f"ill-conditioned input: a BatchNorm normalises {min(sizes)} values per channel (< {MIN_BATCH_NORM_VALUES})"
    assert_close_to_oracle(result[0], stock[0], oracle[0], "output")
    assert_close_to_oracle(result[1], stock[1], oracle[1], "grad input")
    assert result[2].keys() == oracle[2].keys()
    for name in oracle[2]:
        assert_close_to_oracle(result[2][name], stock[2][name], oracle[2][name], f"grad {name}")
    for name, buffer in oracle[3].items():
        if buffer.is_floating_point():
            assert_close_to_oracle(result[3][name], stock[3][name], buffer, name)
        else:
            assert torch.equal(result[3][name], stock[3][name]), name
