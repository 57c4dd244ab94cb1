"""ConvBNReLU2d / ConvBNReLUPool2d with their FusedBatchNorm2d against stock Conv2d -> BatchNorm2d -> ReLU [-> pool]:
train and eval, forward and every gradient, running statistics over several steps, BatchNorm variants, dtypes and
memory formats; the held BatchNorm's state under copies, conversions and loads; saved memory, compile, autocast."""
import copy
import io

import pytest
import torch
import torch.nn as nn

import fastcnn
from fastcnn.nn import ConvBNReLU2d, ConvBNReLUPool2d, FusedBatchNorm2d
from fastcnn.nn.sequential_fusion import fuse_sequential

from _blocks import backends_here, saved_bytes
from _tolerances import assert_close_to_oracle

BACKEND = [b for b in backends_here("cpu") if b not in ("triton", "reference")][:1] or ["reference"]


@pytest.fixture(autouse=True)
def _backend(one_intra_op_thread):
    with fastcnn.use_backend(BACKEND[0]):
        yield


def _stock(pool="max", norm=None, in_channels=3, channels=6, **conv):
    """A stock Conv2d -> BatchNorm2d -> ReLU [-> pool] with random BN parameters and running statistics."""
    norm = norm or nn.BatchNorm2d(channels)
    layers = [nn.Conv2d(in_channels, channels, 3, padding=1, **conv), norm, nn.ReLU(inplace=True)]
    layers += {"max": [nn.MaxPool2d(2)], "avg": [nn.AvgPool2d(2)], "none": []}[pool]
    stock = nn.Sequential(*layers)
    with torch.no_grad():
        for t in (norm.weight, norm.bias, norm.running_mean):
            if t is not None:
                t.copy_(torch.randn_like(t))
        if norm.running_var is not None:
            norm.running_var.uniform_(0.5, 2)
    return stock


def _step(model, x, grad_seed=1):
    """(output, input grad, {name: grad}, {name: buffer copy}) after one forward/backward."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(grad.to(out.dtype))
    return (out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()})


def _assert_steps_match(stock, x, train, steps=1, dtype=torch.float32):
    """Fused vs stock at `dtype`, both against the stock model in float64, over `steps` forward/backward steps."""
    oracle, stock = copy.deepcopy(stock).double(), copy.deepcopy(stock).to(dtype)
    fused = fuse_sequential(copy.deepcopy(stock))
    for model in (oracle, stock, fused):
        model.train(train)
    for step in range(steps):
        ours, theirs, exact = (_step(m, x.to(d), step) for m, d in ((fused, dtype), (stock, dtype),
                                                                    (oracle, torch.float64)))
        for name, a, b, c in (("output", ours[0], theirs[0], exact[0]), ("grad input", ours[1], theirs[1], exact[1])):
            assert_close_to_oracle(a, b, c, f"step {step} {name}")
        for part in (2, 3):
            assert ours[part].keys() == exact[part].keys()
            for key in exact[part]:
                if exact[part][key].is_floating_point():
                    if key == "0.bias" and train:  # cancelled by the BN: zero here, rounding residue in stock
                        assert not ours[part][key].any(), key
                        continue
                    assert_close_to_oracle(ours[part][key], theirs[part][key], exact[part][key], f"step {step} {key}")
                else:
                    assert torch.equal(ours[part][key], theirs[part][key]), key
    return fused


@pytest.mark.parametrize("pool", ["max", "avg", "none"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_stock_fp32(pool, train, channels_last):
    x = torch.randn(3, 3, 11, 13)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fused = _assert_steps_match(_stock(pool), x, train)
    assert type(fused[0]) is (ConvBNReLU2d if pool == "none" else ConvBNReLUPool2d)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_matches_stock_bf16(train):
    _assert_steps_match(_stock("max"), torch.randn(2, 3, 9, 14).contiguous(memory_format=torch.channels_last),
                        train, dtype=torch.bfloat16)


@pytest.mark.parametrize("pool", ["max", "avg", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_inference_applies_running_statistics_in_the_epilogue_and_matches_stock(pool, dtype, channels_last):
    stock = _stock(pool).eval()
    fused = fuse_sequential(copy.deepcopy(stock).to(dtype))
    x = torch.randn(2, 3, 9, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.profiler.profile() as profile:
        ours = fused(x.to(dtype))
    with torch.no_grad():
        theirs = copy.deepcopy(stock).to(dtype)(x.to(dtype))
        exact = stock.double()(x.double())
    ops = {event.name for event in profile.events()}
    assert "aten::batch_norm" not in ops and "fastcnn::scale_shift_add_relu" in ops, ops  # the fused epilogue ran
    assert_close_to_oracle(ours, theirs, exact, "output")


def _winograd_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.name == "fastcnn::winograd_conv3x3" for e in prof.events())


@pytest.mark.skipif(BACKEND[0] != "cpu", reason="fastcnn._C is not built: no Winograd convolution")
@pytest.mark.parametrize("pool", ["max", "none"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_winograd_sized_block_matches_stock(pool, train, channels_last):
    """A float32 block with the tiles and channels for fastcnn's Winograd convolution: two training steps (forward,
    all gradients, running statistics) or inference match stock within the table. Winograd runs in channels_last
    (fastcnn.ops.conv2d: forward and both gradients) and, in NCHW, in inference with a 2x2 max pool (the BatchNorm
    folded into one fused call) - which follows every change of state: .data edits, an optimizer step,
    load_state_dict."""
    x = torch.randn(2, 64, 36, 30)  # 540 tiles
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    stock = _stock(pool, in_channels=64, channels=64)
    if train:
        fused = _assert_steps_match(stock, x, train=True, steps=2)
        calls = _winograd_calls(lambda: fused(x.requires_grad_()).sum().backward())
        assert calls == (2 if channels_last else 0)  # forward, input gradient
        return
    fused = fuse_sequential(stock_copy := copy.deepcopy(stock)).eval()  # shares stock_copy's tensors
    stock_copy.eval()
    optimizer = torch.optim.SGD(stock_copy.parameters(), lr=0.5)

    def data_edits():
        stock_copy[1].running_var.data.mul_(3)
        stock_copy[1].weight.data.neg_()

    def optimizer_step():
        for p in stock_copy.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()

    def load_state_dict():
        fused.load_state_dict(_stock(pool, in_channels=64, channels=64).state_dict())

    for change, then in (("none", data_edits), (".data edits", optimizer_step), ("an optimizer step", load_state_dict),
                         ("load_state_dict", None)):
        with torch.no_grad():
            # the BatchNorm folded into one fused Winograd call
            assert _winograd_calls(lambda: fused(x)) == (1 if channels_last or pool == "max" else 0)
            ours, theirs, exact = fused(x), stock_copy(x), copy.deepcopy(stock_copy).double()(x.double())
        assert_close_to_oracle(ours, theirs, exact, f"output after {change}")
        if then is not None:
            then()


@pytest.mark.parametrize("norm", [
    lambda: nn.BatchNorm2d(6), lambda: nn.BatchNorm2d(6, momentum=None), lambda: nn.BatchNorm2d(6, momentum=0.3),
    lambda: nn.BatchNorm2d(6, track_running_stats=False), lambda: nn.BatchNorm2d(6, affine=False, eps=1e-3),
], ids=["default", "cumulative", "momentum", "no-running-stats", "no-affine"])
def test_running_statistics_over_several_steps(norm):
    stock = _stock("max", norm())
    fused = _assert_steps_match(stock, torch.randn(2, 3, 7, 10), train=True, steps=3)
    if stock[1].track_running_stats:
        assert fused[1].num_batches_tracked.item() == 3
    _assert_steps_match(stock, torch.randn(2, 3, 7, 10), train=False)  # eval on the running (or batch) statistics


def test_other_conv_options_match_stock():
    stock = _stock("avg", in_channels=4, channels=6, stride=2, groups=2, bias=False, padding_mode="reflect")
    _assert_steps_match(stock, torch.randn(2, 4, 13, 11), train=True)


def test_float64_gradcheck_of_the_module():
    fused = fuse_sequential(_stock("max", in_channels=2, channels=3)).double().train()
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fused, [x])
    names = ["0.weight", "1.weight", "1.bias"]
    values = [fused.get_parameter(n).detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(
        lambda *v: torch.func.functional_call(fused, dict(zip(names, v)), (x.detach(),)), values)


def test_state_dict_keys_and_shared_tensors():
    stock = _stock("max")
    fused = fuse_sequential(stock)
    assert [type(m).__name__ for m in fused] == ["ConvBNReLUPool2d", "FusedBatchNorm2d", "FusedAway", "FusedAway"]
    assert list(fused.state_dict()) == list(stock.state_dict())  # no key twice, none moved
    assert fused[0].weight is stock[0].weight and fused[1].running_mean is stock[1].running_mean
    assert fused[0].batch_norm is fused[1] and "batch_norm" not in dict(fused[0].named_children())


def test_held_batch_norm_survives_copies_conversions_and_loads():
    fused = fuse_sequential(_stock("avg"))
    x = torch.randn(2, 3, 8, 6)
    for model in (copy.deepcopy(fused), fused.double().float()):
        assert model[0].batch_norm is model[1]
    clone = copy.deepcopy(fused)
    clone[1].running_mean.add_(1)  # the copy's state is its own
    assert not torch.equal(clone[1].running_mean, fused[1].running_mean)
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    fresh = fuse_sequential(_stock("avg"))
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())), strict=True)
    fused.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), fused(x))  # eval folds the loaded statistics, not stale ones
        fresh.train()
        fresh(x)
        assert fresh[1].num_batches_tracked.item() == 1 and fresh[0].batch_norm.training


def test_training_saves_less_activation_memory():
    stock = _stock("max", in_channels=8, channels=16).train()
    fused = fuse_sequential(copy.deepcopy(stock))
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    ours, theirs = saved_bytes(fused, x), saved_bytes(stock, x)
    # stock: x, conv output y, BN output (ReLU in place), int64 pool indices; fused: x, y, pooled output, uint8 code
    assert ours <= 0.65 * theirs, (ours, theirs)


def test_no_grad_training_updates_running_statistics_like_stock():
    stock = _stock("max").train()
    fused = fuse_sequential(copy.deepcopy(stock))
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), stock(x))
    torch.testing.assert_close(fused[1].running_var, stock[1].running_var)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_autocast_bfloat16(train):
    stock = _stock("max").train(train)
    fused = fuse_sequential(copy.deepcopy(stock))
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = fused(x), stock(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float(), atol=0.1, rtol=0.05)


def test_torch_compile_train_and_eval():
    stock = _stock("max").train()
    fused = fuse_sequential(copy.deepcopy(stock))
    compiled = torch.compile(fused, backend="aot_eager", dynamic=False)
    x = torch.randn(2, 3, 8, 10)
    for train in (True, False):
        stock.train(train)
        fused.train(train)
        ours, theirs = compiled(x), stock(x)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        ours.sum().backward()
        theirs.sum().backward()
        torch.testing.assert_close(fused[1].weight.grad, stock[1].weight.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fused[1].running_mean, stock[1].running_mean)


def test_direct_construction_and_errors():
    norm = FusedBatchNorm2d(4)
    block = nn.Sequential(ConvBNReLUPool2d(3, 4, 3, padding=1, pool="avg", batch_norm=norm), norm)
    assert block(torch.randn(2, 3, 6, 6)).shape == (2, 4, 3, 3)
    assert norm(torch.ones(1)).equal(torch.ones(1))  # the placeholder passes its input through
    with pytest.raises(TypeError, match="batch_norm must be a fastcnn.nn.FusedBatchNorm2d"):
        ConvBNReLU2d(3, 4, 3, batch_norm=nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="4 features but the convolution has 5 output channels"):
        ConvBNReLU2d(3, 5, 3, batch_norm=norm)
    with pytest.raises(ValueError, match="expected 4D input"):
        block(torch.randn(3, 6, 6))
    single = FusedBatchNorm2d(4)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        nn.Sequential(ConvBNReLU2d(3, 4, 1, batch_norm=single), single).train()(torch.randn(1, 3, 1, 1))
    with pytest.raises(TypeError, match="batch_norm must be an nn.BatchNorm2d"):
        ConvBNReLU2d.from_modules(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), nn.ReLU())


def test_only_exact_runs_are_fused():
    layers = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),  # pool stays stock
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Sigmoid(),  # no ReLU: left alone
        nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4), nn.ReLU(),  # not a plain BatchNorm2d: left alone
    )
    assert [type(m).__name__ for m in fuse_sequential(layers)] == [
        "ConvBNReLU2d", "FusedBatchNorm2d", "FusedAway", "MaxPool2d", "Conv2d", "BatchNorm2d", "Sigmoid",
        "Conv2d", "SyncBatchNorm", "ReLU"]
