"""fastcnn.nn.ConvTranspose2d is a drop-in nn.ConvTranspose2d: constructor, init, state_dict, output_size, ReLU."""
import pytest
import torch
import torch.nn as nn

import fastcnn

ARGS = [dict(in_channels=4, out_channels=6, kernel_size=2, stride=2),
        dict(in_channels=4, out_channels=6, kernel_size=4, stride=2, padding=1, bias=False),
        dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2),
             groups=2, dilation=(1, 1))]


@pytest.mark.parametrize("kwargs", ARGS)
def test_same_parameters_init_and_state_dict_as_torch(kwargs):
    torch.manual_seed(3)
    stock = nn.ConvTranspose2d(**kwargs)
    torch.manual_seed(3)
    fused = fastcnn.nn.ConvTranspose2d(**kwargs)
    assert isinstance(fused, nn.ConvTranspose2d)
    assert stock.state_dict().keys() == fused.state_dict().keys()
    for key, value in stock.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, atol=0, rtol=0)
    x = torch.randn(2, 4, 5, 7)
    torch.testing.assert_close(fused(x), stock(x))
    fused.load_state_dict(stock.state_dict())


def test_relu_equals_sequential_and_from_modules_shares_parameters():
    conv = nn.ConvTranspose2d(3, 5, 4, stride=2, padding=1)
    fused = fastcnn.nn.ConvTranspose2d.from_modules(conv, nn.ReLU())
    assert fused.weight is conv.weight and fused.activation == "relu" and "activation='relu'" in repr(fused)
    x = torch.randn(2, 3, 6, 5)
    torch.testing.assert_close(fused(x), torch.relu(conv(x)))
    torch.testing.assert_close(fastcnn.nn.ConvTranspose2d.from_modules(conv)(x), conv(x))


def test_output_size_picks_output_padding_like_torch():
    stock = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)
    fused = fastcnn.nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1)
    fused.load_state_dict(stock.state_dict())
    x = torch.randn(1, 3, 5, 5)
    for size in ([9, 9], [10, 10], [1, 2, 10, 9]):
        torch.testing.assert_close(fused(x, output_size=size), stock(x, output_size=size))
    with pytest.raises(ValueError):
        fused(x, output_size=[12, 12])


def test_channels_last_and_autocast():
    layer = fastcnn.nn.ConvTranspose2d(4, 3, 2, stride=2, activation="relu")
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    assert layer(x).is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="activation must be None, 'none' or 'relu'"):
        fastcnn.nn.ConvTranspose2d(3, 4, 2, activation="tanh")
    with pytest.raises(ValueError, match="zeros"):
        fastcnn.nn.ConvTranspose2d(3, 4, 2, padding_mode="reflect")
    with pytest.raises(TypeError, match="must be an nn.ConvTranspose2d"):
        fastcnn.nn.ConvTranspose2d.from_modules(nn.Conv2d(3, 4, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", [2, 3, (2, 3)])
@pytest.mark.parametrize("grad_mode", ["train", "no_grad", "inference_mode"])
def test_channels_last_kernel_equal_stride_exact(dtype, kernel, grad_mode):
    """kernel == stride without padding, channels_last fp32/fp64 on the CPU: the GEMM written into the output rows
    (csrc/cpu/conv_transpose.cpp, gemm_forward_channels_last_cpu) equals stock exactly on small-integer data, with
    and without bias and ReLU, in every grad mode (its BLAS calls run in at::parallel_for's worker threads), and in
    training the gradients too. Odd sizes; 37 input rows of 3 pixels, so several GEMM blocks and a partial last one."""
    for bias, activation in ((True, "relu"), (False, "relu"), (True, None)):
        stock = nn.ConvTranspose2d(5, 7, kernel, stride=kernel, bias=bias, dtype=dtype)
        fused = fastcnn.nn.ConvTranspose2d(5, 7, kernel, stride=kernel, bias=bias, dtype=dtype, activation=activation)
        with torch.no_grad():
            for p in stock.parameters():
                p.copy_(torch.randint(-3, 4, p.shape, dtype=dtype))
        fused.load_state_dict(stock.state_dict())
        stock, fused = stock.to(memory_format=torch.channels_last), fused.to(memory_format=torch.channels_last)
        x = torch.randint(-3, 4, (2, 5, 37, 3), dtype=dtype).to(memory_format=torch.channels_last)
        act = torch.relu if activation else (lambda y: y)
        if grad_mode == "train":
            xs, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
            ys, yf = act(stock(xs)), fused(xf)
            g = torch.randint(-3, 4, ys.shape, dtype=dtype)
            ys.backward(g)
            yf.backward(g)
            torch.testing.assert_close(xf.grad, xs.grad, atol=0, rtol=0)
            for pf, ps in zip(fused.parameters(), stock.parameters()):
                torch.testing.assert_close(pf.grad, ps.grad, atol=0, rtol=0)
        else:
            with torch.no_grad() if grad_mode == "no_grad" else torch.inference_mode():
                ys, yf = act(stock(x)), fused(x)
        assert yf.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(yf, ys, atol=0, rtol=0)


@pytest.mark.stock_routes
def test_route_follows_the_call_mode(monkeypatch):
    """The module remembers its route per input signature and mode: a CPU call whose output lies between the
    inference and training size thresholds of its kind runs stock when autograd records it and fused when not, in
    any order."""
    from fastcnn.nn import conv_transpose as module_file
    from fastcnn.ops.conv_transpose import SMALL_OUTPUT

    fused_calls = []
    original = module_file.functional.conv_transpose2d
    monkeypatch.setattr(module_file.functional, "conv_transpose2d",
                        lambda *args: fused_calls.append(1) or original(*args))
    up = fastcnn.nn.ConvTranspose2d(4, 8, 2, stride=2, activation="relu")
    x = torch.randn(1, 4, 64, 64)
    assert SMALL_OUTPUT[True, "infer"] <= 8 * 128 * 128 < SMALL_OUTPUT[True, "train"]
    up(x)
    assert fused_calls == []  # recorded by autograd: small for training, stock
    with torch.no_grad():
        up(x)
    assert fused_calls == [1]  # not recorded: large for inference, fused
    up(x)
    assert fused_calls == [1]
