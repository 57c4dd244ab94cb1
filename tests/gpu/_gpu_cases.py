"""Helpers of the GPU tests (tests/gpu): self-contained, so they do not depend on the layout of tests/ops.

Rules. A CUDA op is compared with the same op on CPU (the behavioural model, itself tested against stock PyTorch)
where both are meant to agree to rounding; a public function, module or model is compared with stock PyTorch by the
2x-stock-error rule (fastcnn's error against a float64 oracle at most twice stock's at the same dtype, plus a floor).
Nothing here touches CUDA at import."""
import copy

import torch

import fastcnn

ERROR_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
DTYPE_IDS = ["fp32", "bf16", "fp16", "fp64"]


def fmt(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _max_error(result, oracle):
    diff = (result.double().cpu() - oracle.double().cpu()).abs()
    both_nan = torch.isnan(result.double().cpu()) & torch.isnan(oracle.double().cpu())
    return torch.where(both_nan, torch.zeros_like(diff), diff).nan_to_num(nan=float("inf")).max().item()


def assert_close_to_oracle(result, stock, oracle, name=""):
    """result (fastcnn) and stock (PyTorch), same dtype, against a float64 oracle: error <= 2 * stock's + floor."""
    assert tuple(result.shape) == tuple(oracle.shape), f"{name}: shape {tuple(result.shape)} != {tuple(oracle.shape)}"
    if oracle.numel() == 0:
        return
    scale = max(1.0, oracle.double().nan_to_num().abs().max().item())
    allowed = 2 * _max_error(stock, oracle) + ERROR_FLOOR[result.dtype] * scale
    error = _max_error(result, oracle)
    assert error <= allowed, f"{name}: error {error:.3g} > allowed {allowed:.3g} ({result.dtype})"


def assert_matches_cpu(cuda_result, cpu_result, name="", exact=False):
    """A CUDA op's result against the CPU kernel's on the same inputs: equal, or within a few units of rounding."""
    assert cuda_result.is_cuda, name
    got = cuda_result.cpu()
    assert got.shape == cpu_result.shape and got.dtype == cpu_result.dtype, f"{name}: {got.shape} {got.dtype}"
    if exact:
        assert torch.equal(got, cpu_result), f"{name}: differs from the CPU kernel"
        return
    eps = torch.finfo(got.dtype).eps if got.is_floating_point() else 0
    scale = max(1.0, cpu_result.double().abs().max().item()) if cpu_result.numel() else 1.0
    torch.testing.assert_close(got, cpu_result, rtol=8 * eps, atol=8 * eps * scale, msg=lambda m: f"{name}: {m}")


def run_module(module, x, grad_out):
    """(output, input gradient, {parameter name: gradient}) of one forward + backward on a copy of x."""
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def assert_module_matches_stock(fused, stock, x, backend="cuda", train=True, grads=True):
    """fused (under backend) and stock at x's dtype, and a float64 CPU copy of stock as the oracle: outputs, floating
    buffers and (unless bf16/fp16 training, where a ReLU input within rounding of 0 may flip) gradients."""
    oracle = copy.deepcopy(stock).double().cpu().train(train)
    fused, stock = fused.to(x.device, x.dtype).train(train), stock.to(x.device, x.dtype).train(train)
    with torch.no_grad():
        probe = stock(x)
    grad_out = torch.randn(probe.shape, dtype=torch.float64).to(x.device)
    with fastcnn.use_backend(backend):
        out, gx, gp = run_module(fused, x, grad_out)
    s_out, s_gx, s_gp = run_module(stock, x, grad_out)
    o_out, o_gx, o_gp = run_module(oracle, x.double().cpu(), grad_out.cpu())
    assert out.is_cuda == x.is_cuda
    assert_close_to_oracle(out, s_out, o_out, "out")
    for name, buffer in fused.named_buffers():
        if buffer.is_floating_point():
            assert_close_to_oracle(buffer, stock.get_buffer(name), oracle.get_buffer(name), name)
    if not grads or (train and x.dtype in (torch.bfloat16, torch.float16)):
        return
    assert_close_to_oracle(gx, s_gx, o_gx, "grad_x")
    for name, g in gp.items():
        assert_close_to_oracle(g, s_gp[name], o_gp[name], name)
