"""fastcnn.nn.InceptionBlock against torchvision's GoogLeNet Inception block: keys, init and strict loading both
ways; forward, backward and running statistics in train and eval (float32 by the 2x-stock rule against float64,
bfloat16), both memory formats, odd sizes; the grouped and 5x5 variants; no concatenation copy; torch.compile;
fastcnn.convert."""
import copy

import pytest
import torch
from _block_parity import assert_block_matches_stock, run
from torchvision.models.googlenet import Inception as TorchvisionInception

import fastcnn
from fastcnn.nn import InceptionBlock

from _blocks import backends_here
from _tolerances import assert_close_to_oracle

COMPILED = [b for b in backends_here("cpu") if b not in ("triton", "reference")]
ARGS = (5, 3, 4, 6, 2, 3, 3)  # in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj: odd, uneven widths
SIZE = (7, 5)


def _randomize(block):
    """Non-trivial BatchNorm state, as in a trained network."""
    with torch.no_grad():
        for bn in (m for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.5)
            bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.5, 2)
    return block


def _pair():
    """(fastcnn block, torchvision block) with one random state_dict."""
    stock = _randomize(TorchvisionInception(*ARGS))
    block = InceptionBlock(*ARGS)
    block.load_state_dict(stock.state_dict())
    return block, stock


def _compare(block, stock, train, dtype, memory_format, channels, backend):
    x = torch.randn(3, channels, *SIZE).to(dtype).contiguous(memory_format=memory_format)
    grad_out = torch.randn(3, sum(norm.num_features for norm in _last_norms(stock)), *SIZE)
    assert_block_matches_stock(block, stock, x, grad_out, backend, train)


def _last_norms(block):
    return [block.branch1.bn, block.branch2[1].bn, block.branch3[1].bn, block.branch4[1].bn]


def test_keys_init_and_strict_loading_match_torchvision():
    torch.manual_seed(3)
    stock = TorchvisionInception(*ARGS)
    torch.manual_seed(3)
    block = InceptionBlock(*ARGS)
    ours, theirs = block.state_dict(), stock.state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    assert [type(m).__name__ for m in block.modules()][1:] == [type(m).__name__ for m in stock.modules()][1:]
    _randomize(stock)
    block.load_state_dict(stock.state_dict(), strict=True)
    TorchvisionInception(*ARGS).load_state_dict(block.state_dict(), strict=True)
    assert block.branch3[1].conv.kernel_size == (3, 3) and block.branch4[0].ceil_mode and block.branch1.bn.eps == 1e-3


SETTINGS = [pytest.param(b, dtype, fmt, id=f"{b}-{name}") for b in COMPILED
            for dtype, fmt, name in ((torch.float32, torch.contiguous_format, "fp32-nchw"),
                                     (torch.float32, torch.channels_last, "fp32-nhwc"),
                                     (torch.bfloat16, torch.channels_last, "bf16-nhwc"))]
SETTINGS.append(pytest.param("reference", torch.float32, torch.channels_last, id="reference-fp32-nhwc"))


@pytest.mark.parametrize("backend, dtype, memory_format", SETTINGS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_matches_torchvision(backend, dtype, memory_format, train):
    block, stock = _pair()
    _compare(block, stock, train, dtype, memory_format, ARGS[0], backend)


GROUPED = (6, 3, 4, 6, 2, 4, 3)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("options", [dict(groups=2), dict(branch3_kernel_size=5)], ids=["groups2", "5x5"])
def test_grouped_and_5x5_variants_match_the_stock_sequence(backend, train, options):
    """Against the same block with fused=False (torchvision's module sequence and torch.cat)."""
    args = GROUPED if "groups" in options else ARGS
    stock = _randomize(InceptionBlock(*args, fused=False, **options))
    block = InceptionBlock(*args, **options)
    block.load_state_dict(stock.state_dict())
    conv = block.branch3[1].conv
    assert conv.groups == options.get("groups", 1) and conv.kernel_size[0] == options.get("branch3_kernel_size", 3)
    _compare(block, stock, train, torch.float32, torch.channels_last, args[0], backend)


@pytest.mark.parametrize("backend", COMPILED)
def test_inference_matches_torchvision_under_no_grad(backend):
    """Eval under no_grad folds BatchNorm into the convolutions."""
    block, stock = (m.eval() for m in _pair())
    x = torch.randn(2, ARGS[0], *SIZE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), fastcnn.use_backend(backend):
        out = block(x)
    with torch.no_grad():
        assert_close_to_oracle(out, stock(x), copy.deepcopy(stock).double()(x.double()), "out")


def _profiled_ops(block, x):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        block(x)
    return [event.name for event in prof.events()]


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_branches_store_into_the_output_without_a_concatenation(backend, train):
    block, stock = (m.train(train) for m in _pair())
    x = torch.randn(2, ARGS[0], *SIZE).contiguous(memory_format=torch.channels_last)
    with fastcnn.use_backend(backend):
        ops = _profiled_ops(block, x)
    assert "aten::cat" not in ops
    assert ops.count("fastcnn::scale_shift_relu_out") == 4
    assert "aten::cat" in _profiled_ops(stock, x)  # the profile does see torchvision's concatenation


@pytest.mark.parametrize("backend", COMPILED + ["reference"])
def test_training_step_under_torch_compile(backend):
    block, _ = _pair()
    compiled_block = copy.deepcopy(block)
    x = torch.randn(2, ARGS[0], *SIZE).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(2, 15, *SIZE)
    with fastcnn.use_backend(backend):
        eager = run(block, x, grad_out)
        compiled = run(torch.compile(compiled_block, backend="aot_eager"), x, grad_out)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
    torch.testing.assert_close(list(compiled[2].values()), list(eager[2].values()))  # keys gain '_orig_mod.'
    torch.testing.assert_close(compiled_block.branch2[1].bn.running_var, block.branch2[1].bn.running_var)


@pytest.mark.parametrize("backend", COMPILED)
def test_autocast_matches_stock_under_autocast(backend):
    block, stock = (m.eval() for m in _pair())
    x = torch.randn(2, ARGS[0], *SIZE)
    with torch.autocast("cpu", dtype=torch.bfloat16), fastcnn.use_backend(backend):
        out = block(x)
        expected = stock(x)
    assert out.dtype == expected.dtype
    assert_close_to_oracle(out, expected, copy.deepcopy(stock).double()(x.double()), "out")


def test_convert_replaces_torchvision_inception_blocks():
    stock = torch.nn.Sequential(_randomize(TorchvisionInception(*ARGS)), torch.nn.ReLU()).eval()
    converted = fastcnn.convert(stock)
    assert type(converted[0]) is InceptionBlock and converted[0].fused
    assert list(converted.state_dict()) == list(stock.state_dict())
    x = torch.randn(2, ARGS[0], *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), stock(x))
    other = TorchvisionInception(*ARGS)
    other.branch2[1].bn.momentum = 0.3  # a hyperparameter InceptionBlock does not build: left alone
    assert type(fastcnn.convert(other)) is TorchvisionInception


@pytest.mark.parametrize("kwargs, message", [
    (dict(groups=3), "groups=3 must divide .* ch3x3red=4, ch3x3=8"),
    (dict(groups=0), "groups must be a positive int"),
    (dict(branch3_kernel_size=4), "branch3_kernel_size must be a positive odd int"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        InceptionBlock(6, 3, 4, 8, 3, 6, 3, **kwargs)
