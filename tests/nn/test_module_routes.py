"""Module route tables: where a fused block was measured slower than its stock layers (float32 residual and Inception
blocks on CPU), it runs those layers - the same numbers and state as stock - unless a backend is forced or
`skip_stock_routes()` is active; elsewhere (float64 here) it runs fused. `fastcnn.info` lists the tables."""
import copy

import pytest
import torch

import fastcnn
from fastcnn.info import report
from fastcnn.nn import inception, residual
from fastcnn.ops.conv2d import winograd_runs

pytestmark = pytest.mark.stock_routes


def _bottleneck():
    return fastcnn.nn.Bottleneck(32, 8)


def _inception():
    return fastcnn.nn.InceptionBlock(16, 4, 4, 8, 2, 4, 4)


def block_in_channels(block):
    return 32 if isinstance(block, residual._ResidualBlock) else 16


def _counting_fused_forward(monkeypatch, kind):
    """Counts the calls of the block kind's fused forward."""
    calls = []
    method = "_fused_forward" if kind is residual._ResidualBlock else "_branch_epilogue"
    original = getattr(kind, method)

    def counted(self, *args):
        calls.append(method)
        return original(self, *args)

    monkeypatch.setattr(kind, method, counted)
    return calls


@pytest.mark.parametrize("make,kind", [(_bottleneck, residual._ResidualBlock), (_inception, inception.InceptionBlock)])
@pytest.mark.parametrize("train", [True, False])
def test_cpu_float32_runs_stock_layers_unless_fused_is_asked_for(monkeypatch, make, kind, train):
    block = make().train(train)
    x = torch.randn(2, block_in_channels(block), 8, 8)
    calls = _counting_fused_forward(monkeypatch, kind)
    with torch.no_grad():
        block(x)
    assert calls == []  # routed to the stock layers
    with torch.no_grad(), fastcnn.nn.skip_stock_routes():
        block(x)
    assert calls  # fused when asked for
    calls.clear()
    with torch.no_grad(), fastcnn.use_backend("cpu"):
        block(x)
    assert calls  # a forced backend runs fastcnn's path


@pytest.mark.parametrize("make,kind", [(_bottleneck, residual._ResidualBlock), (_inception, inception.InceptionBlock)])
def test_unmeasured_dtype_runs_fused(monkeypatch, make, kind):
    block = make().double()
    calls = _counting_fused_forward(monkeypatch, kind)
    with torch.no_grad():
        block(torch.randn(2, block_in_channels(block), 8, 8, dtype=torch.float64))
    assert calls


def test_routed_block_trains_exactly_as_stock():
    """The routed block is the stock layer sequence: outputs, gradients and running statistics equal torchvision's
    Bottleneck with the same state, bit for bit."""
    from torchvision.models.resnet import Bottleneck

    ours, stock = _bottleneck(), Bottleneck(32, 8)
    stock.load_state_dict(ours.state_dict())
    x = torch.randn(4, 32, 8, 8)
    out, expected = ours(x), stock(x)
    out.sum().backward()
    expected.sum().backward()
    assert torch.equal(out, expected)
    for (name, p), q in zip(ours.named_parameters(), stock.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(ours.named_buffers(), stock.buffers()):
        assert torch.equal(b, c), name


def test_info_lists_the_stock_routes():
    text = report()
    assert "residual block (runs its stock layers where measured slower than them):" in text
    assert "_residual.json#layer2-train" in text and "_inception.json#inception3a-infer" in text


def test_a_module_route_only_sends_to_stock():
    from fastcnn.ops._dispatch import ModuleRoutes, Route

    with pytest.raises(ValueError, match="can only send the module to 'reference'"):
        ModuleRoutes("test block", [Route("cpu", device="cpu")])


@pytest.mark.parametrize("pool", ["max", "avg", "none"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_routed_conv_module_computes_exactly_as_its_stock_layers(pool, padding_mode):
    """A fused conv module whose op routes to stock (a small CPU call) is Conv2d -> ReLU [-> pool]: outputs and
    gradients bit for bit, padding modes and hooks included, and without the fused op (no fastcnn kernel runs)."""
    conv = torch.nn.Conv2d(5, 7, 3, padding=1, padding_mode=padding_mode)
    relu = torch.nn.ReLU()
    stock_pool = {"max": torch.nn.MaxPool2d(2), "avg": torch.nn.AvgPool2d(2), "none": None}[pool]
    if stock_pool is None:
        fused, stock = fastcnn.nn.ConvReLU2d.from_modules(conv, relu), torch.nn.Sequential(conv, relu)
    else:
        fused = fastcnn.nn.ConvReLUPool2d.from_modules(conv, relu, stock_pool)
        stock = torch.nn.Sequential(conv, relu, stock_pool)
    seen = []
    fused.register_forward_hook(lambda module, args, out: seen.append(out))
    x = torch.randn(2, 5, 6, 7, requires_grad=True)
    out = fused(x)
    grads = torch.autograd.grad(out.square().sum(), (x, conv.weight, conv.bias))
    expected = stock(x)
    assert torch.equal(out, expected) and seen[0] is out
    assert "fastcnn" not in str(out.grad_fn.name())
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), (x, conv.weight, conv.bias))):
        assert torch.equal(got, want)


@pytest.mark.parametrize("train", [True, False])
def test_small_conv_bn_block_runs_its_stock_layers(train):
    """A fused conv-BN-ReLU-pool run below SMALL_OUTPUT output elements (float32, CPU) runs Conv2d -> BatchNorm2d ->
    ReLU -> MaxPool2d themselves: outputs, gradients and running statistics bit for bit, no fastcnn op."""
    from fastcnn.nn import conv_bn

    stock = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.MaxPool2d(2)).train(train)
    fused = fastcnn.convert(copy.deepcopy(stock))
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    assert 2 * 8 * 10 * 10 < conv_bn.SMALL_OUTPUT
    out, want = fused(x), stock(x)
    assert torch.equal(out, want) and "fastcnn" not in out.grad_fn.name()
    got = torch.autograd.grad(out.square().sum(), [x, *fused.parameters()])
    for g, w in zip(got, torch.autograd.grad(want.square().sum(), [x, *stock.parameters()])):
        assert torch.equal(g, w)
    for b, c in zip(fused.buffers(), stock.buffers()):
        assert torch.equal(b, c)
    with fastcnn.ops.skip_stock_routes():  # fused; in eval with trainable parameters that is the stock ops too
        assert ("fastcnn" in fused(x).grad_fn.name()) == train


def test_conv_module_remembers_its_route_per_input_signature_and_route_state(monkeypatch):
    """A fused conv module works its route out once per input signature (shape, strides, dtype, device) and route
    state: the same call again is not asked anew, while another layout, another dtype, a forced backend or skipped
    stock routes are - and get their own answer, never a remembered one."""
    asked = []
    original = fastcnn.nn.ConvReLUPool2d._route_says_stock
    monkeypatch.setattr(fastcnn.nn.ConvReLUPool2d, "_route_says_stock",
                        lambda self, x, pool: asked.append((x.dtype, x.is_contiguous())) or original(self, x, pool))
    module = fastcnn.nn.ConvReLUPool2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 6, 6)

    def runs_fused(x):
        return "fastcnn" in module(x.requires_grad_()).grad_fn.name()

    assert not runs_fused(x) and not runs_fused(x.detach().clone())  # small CPU float32: stock, asked once
    assert asked == [(torch.float32, True)]
    assert not runs_fused(x.detach().contiguous(memory_format=torch.channels_last))
    assert len(asked) == 2
    with fastcnn.ops.skip_stock_routes():
        assert runs_fused(x.detach())
    with fastcnn.use_backend("reference"):  # forced: the op's path, here its plain-PyTorch backend
        module(x)
    assert len(asked) == 4
    assert not runs_fused(x.detach())  # the route state restored, the remembered answer holds again
    assert len(asked) == 4
    module.double()(x.double())
    assert asked[-1] == (torch.float64, True) and len(asked) == 5


def test_unfused_context_is_per_thread():
    """``unfused()`` open in one thread leaves fused modules in every other thread fused."""
    import threading

    from fastcnn.nn.unfused import in_stock_slot, is_unfused, stock_slots

    opened, release, seen = threading.Event(), threading.Event(), []

    def hold():
        with fastcnn.nn.unfused(), stock_slots():
            seen.append((is_unfused(), in_stock_slot()))
            opened.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert opened.wait(10)
        assert seen == [(True, True)] and not is_unfused() and not in_stock_slot()
    finally:
        release.set()
        thread.join()
    assert not is_unfused() and not in_stock_slot()


@pytest.mark.skipif(not winograd_runs(
    torch.empty(1, 64, 56, 56).contiguous(memory_format=torch.channels_last), torch.empty(64, 64, 3, 3), (1, 1),
    (1, 1), (1, 1), 1), reason="Winograd's rule does not take this layer")
def test_small_conv_bn_block_whose_convolution_is_winograd_runs_fused():
    """Below SMALL_OUTPUT a conv-BN block still runs fused where its convolution is Winograd's (channels_last, enough
    tiles and channels): VGG-16-BN block1 at batch 1 measured 1.11x inference, 1.04x training that way."""
    from fastcnn.nn import conv_bn

    stock = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
                                torch.nn.MaxPool2d(2)).to(memory_format=torch.channels_last)
    fused = fastcnn.convert(copy.deepcopy(stock))
    x = torch.randn(1, 64, 56, 56).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert 64 * 56 * 56 < conv_bn.SMALL_OUTPUT
    assert "fastcnn" in fused(x).grad_fn.name()


@pytest.mark.parametrize("channels_last", [False, True])
def test_routed_conv_module_compiles_without_graph_breaks(channels_last):
    """Under torch.compile the module works its route out while dynamo traces (nothing read from or written to its
    remembered answers): one graph, the stock result, and eager calls before and after still remember theirs."""
    module = fastcnn.nn.ConvReLUPool2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 6, 6)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    want = module(x)  # eager: remembered (small CPU call: stock)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), want, rtol=0, atol=0)
    assert len(module.__dict__["_stock_route_memo"]) == 1
    torch.testing.assert_close(module(x), want, rtol=0, atol=0)
