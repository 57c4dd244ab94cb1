"""Fused ConvTranspose2d + bias + ReLU (fastcnn.nn.ConvTranspose2d) against stock nn.ConvTranspose2d -> ReLU, on the
decoder shapes of a U-Net: the 2x2 stride-2 upsampling (kernel == stride: one GEMM + a pixel-shuffle store) and the
4x4 stride-2 padding-1 upsampling (four 2x2 phase convolutions).

Modes: "fwd" (forward under torch.no_grad) and "fwd+bwd" (forward + backward: gradients of the input, the weight and
the bias). Providers: stock eager (cudnn.benchmark on GPU), torch.compile of it (default mode), and fastcnn on every
backend that runs on the device; for the C++/CUDA backends also "+phase-split", the stride-phase split forced where
the router keeps ATen's transposed convolution (kernel != stride), to time it before routing shapes to it. Every
provider is checked against a float64 oracle in the same run (_harness.check), and the ratio baseline time / fastcnn
time is reported (> 1: fastcnn is faster).

--sweep: small and mid-sized upsamplings in NCHW (contiguous) - the encoder-decoder's 2x2 stride-2 decoder steps
(bench_models.py, width 0.25 at 64^2) and 4x4 stride-2 ones - where the per-call costs decide the route
(fastcnn/ops/conv_transpose ROUTES); results go to conv_transpose_sweep.json.

    python benchmarks/bench_conv_transpose.py [--device cpu|cuda] [--quick] [--sweep] [--batch N] [--res-scale F]
        [--budget S] [--out DIR]
"""
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import fastcnn  # noqa: E402

# (name, in channels, out channels, input resolution, kernel, stride, padding): a U-Net decoder's upsampling steps.
SHAPES = [("k2s2 512->256 @28", 512, 256, 28, 2, 2, 0), ("k2s2 128->64 @112", 128, 64, 112, 2, 2, 0),
          ("k4s2p1 256->128 @56", 256, 128, 56, 4, 2, 1), ("k4s2p1 64->32 @112", 64, 32, 112, 4, 2, 1)]
SWEEP = [("k2s2 128->128 @2", 128, 128, 2, 2, 2, 0), ("k2s2 128->128 @4", 128, 128, 4, 2, 2, 0),
         ("k2s2 64->64 @8", 64, 64, 8, 2, 2, 0), ("k2s2 32->32 @16", 32, 32, 16, 2, 2, 0),
         ("k2s2 16->16 @32", 16, 16, 32, 2, 2, 0), ("k2s2 64->64 @32", 64, 64, 32, 2, 2, 0),
         ("k2s2 128->64 @56", 128, 64, 56, 2, 2, 0), ("k4s2p1 64->32 @14", 64, 32, 14, 4, 2, 1),
         ("k4s2p1 64->32 @28", 64, 32, 28, 4, 2, 1), ("k4s2p1 64->32 @56", 64, 32, 56, 4, 2, 1)]
LAYOUT = {"cuda": (torch.bfloat16, torch.channels_last), "cpu": (torch.float32, torch.channels_last)}
LAYOUT_NAME = {torch.contiguous_format: "contiguous", torch.channels_last: "channels_last"}
DEFAULT_BATCH = {"cuda": 32, "cpu": 2}
MODES = ("fwd", "fwd+bwd")


class Case:
    """One shape x mode: the stock layer, fastcnn's with the same weights, the input and the float64 oracle."""

    def __init__(self, shape, batch, res_scale, mode, device, fmt=None):
        name, c_in, c_out, res, kernel, stride, padding = shape
        torch.manual_seed(0)
        dtype, default_fmt = LAYOUT[device.type]
        fmt = fmt or default_fmt
        res = max(2, round(res * res_scale))
        stock = nn.ConvTranspose2d(c_in, c_out, kernel, stride, padding)
        fused = fastcnn.nn.ConvTranspose2d(c_in, c_out, kernel, stride, padding, activation="relu")
        fused.load_state_dict(stock.state_dict())
        self.train = mode == "fwd+bwd"
        self.oracle = nn.Sequential(nn.ConvTranspose2d(c_in, c_out, kernel, stride, padding), nn.ReLU()).double()
        self.oracle[0].load_state_dict(stock.state_dict())
        self.stock = nn.Sequential(stock, nn.ReLU()).to(device, dtype, memory_format=fmt)
        self.fused = fused.to(device, dtype, memory_format=fmt)
        self.x = torch.randn(batch, c_in, res, res, device=device, dtype=dtype).to(memory_format=fmt)
        out_res = (res - 1) * stride - 2 * padding + kernel
        self.grad_out = torch.randn(batch, c_out, out_res, out_res, device=device, dtype=dtype)
        self.device, self.dtype = device, dtype
        self.meta = {"op": "conv_transpose2d+bias+relu", "case": name, "mode": mode,
                     "dtype": str(dtype).replace("torch.", ""), "layout": LAYOUT_NAME[fmt],
                     "shape": {"N": batch, "C_in": c_in, "C_out": c_out, "H": res, "W": res, "kernel": kernel,
                               "stride": stride, "padding": padding}}
        self.check_grad_out = self._unambiguous_grad_out()
        self.reference = self.step(self.oracle, self.x.detach().double(), self.check_grad_out.double())()

    def _unambiguous_grad_out(self):
        """The output gradient the check uses: zero where the float64 pre-activation is within 4x stock's error of
        zero. There a correct implementation may take the other ReLU decision (a tie within rounding) and pass or
        stop that element's gradient; stock does so too, at other elements. Timing uses the full ``grad_out``."""
        with torch.no_grad():
            z = self.oracle[0](self.x.double())
            stock_err = (self.stock[0](self.x).double() - z).abs().max()
            ambiguous = z.abs() < 4 * stock_err
        self.meta["check_masked_elements"] = ambiguous.double().mean().item()
        return self.grad_out.masked_fill(ambiguous, 0)

    def step(self, layer, x=None, grad_out=None):
        """A callable running one step of ``layer``; returns the output (and in training the three gradients)."""
        x = self.x if x is None else x
        grad_out = self.grad_out if grad_out is None else grad_out
        params = [p for p in layer.parameters()]
        if not self.train:
            def forward():
                with torch.no_grad():
                    return (layer(x),)
            return forward

        x = x.detach().requires_grad_()

        def forward_backward():
            x.grad = None
            for p in params:
                p.grad = None
            out = layer(x)
            out.backward(grad_out)
            return (out.detach(), x.grad, *(p.grad for p in params))
        return forward_backward

    def work(self):
        """(FLOPs, bytes) of an ideal implementation: 2 * N*H*W * C_in * C_out * k^2 multiply-adds (no multiply by
        an inserted zero), x3 with dgrad and wgrad; bytes = input, output and weight once (x2 in training)."""
        s = self.meta["shape"]
        flops = 2 * s["N"] * s["H"] * s["W"] * s["C_in"] * s["C_out"] * s["kernel"] ** 2
        item = self.x.element_size()
        io = (self.x.numel() + self.grad_out.numel() + s["C_in"] * s["C_out"] * s["kernel"] ** 2) * item
        return (3 * flops, 2 * io) if self.train else (flops, io)


PHASE_SPLIT_VAR = "FASTCNN_CONV_TRANSPOSE_PHASE_SPLIT"


class WithPhaseSplit(torch.nn.Module):
    """Runs ``module`` with the C++/CUDA backend's stride-phase split forced for kernel != stride (the router keeps
    ATen's transposed convolution until the split is measured faster: csrc/conv_transpose.cpp)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        previous = os.environ.get(PHASE_SPLIT_VAR)
        os.environ[PHASE_SPLIT_VAR] = "1"
        try:
            return self.module(x)
        finally:
            if previous is None:
                del os.environ[PHASE_SPLIT_VAR]
            else:
                os.environ[PHASE_SPLIT_VAR] = previous


def providers(device):
    """[(name, factory(case) -> the layer to run)] with stock eager first, and notes on what was left out."""
    found = [("eager", lambda case: case.stock), ("compile", lambda case: torch.compile(case.stock))]
    notes = []
    for backend in ("cuda", "triton", "cpu"):
        reason = fastcnn.ops.why_unavailable(backend, device.type)
        if reason is None:
            found.append((f"fastcnn[{backend}]", lambda case, b=backend: H.WithBackend(case.fused, b)))
        else:
            notes.append(f"fastcnn[{backend}] not benchmarked: {reason}")
        if reason is None and backend != "triton":
            found.append((f"fastcnn[{backend}+phase-split]",
                          lambda case, b=backend: WithPhaseSplit(H.WithBackend(case.fused, b))))
    # What a user gets: the op's route (fastcnn/ops/conv_transpose ROUTES), which sends measured-slower cases to stock.
    found.append(("fastcnn", lambda case: case.fused))
    notes.append("fastcnn = the routed default; fastcnn[<backend>] = that backend forced")
    return found, notes


def provider_steps(case, factory):
    """(the layer, the step whose outputs are checked - with the unambiguous output gradient -, the timed step) of
    one provider."""
    layer = factory(case)
    return layer, case.step(layer, grad_out=case.check_grad_out), case.step(layer)


def case_specs(args, device):
    """The Case constructor arguments (less the device) of a run, in run order."""
    batch = args.batch or DEFAULT_BATCH[device.type]
    if args.sweep:
        return [(shape, batch, args.res_scale, mode, torch.contiguous_format) for shape in SWEEP for mode in MODES]
    return [(shape, batch, args.res_scale, mode) for shape in SHAPES for mode in MODES]


def measure(case, factories, ceilings, timing):
    flops, nbytes = case.work()
    row = dict(case.meta, flops=flops, bytes=nbytes, providers={}, ratios={})
    stock_out, timed = None, {}
    for name, factory in factories:
        torch._dynamo.reset()
        _, checked, timed[name] = provider_steps(case, factory)
        got, row["providers"][name] = H.checked_first_call(checked, stock_out, case.reference, case.dtype,
                                                           case.device)
        stock_out = stock_out or got
    H.time_providers(row, timed, case.device, timing, (flops, nbytes), ceilings, case.dtype)
    return H.finish_row(row)


def main(argv=None):
    args = H.layer_suite_args(__doc__, "32 on GPU, 2 on CPU", argv, sweep="the NCHW sweep of small upsamplings")
    device, env, ceilings = H.begin_run(args, LAYOUT[args.device][0])
    factories, notes = providers(device)
    if args.res_scale != 1.0:
        notes.append(f"input resolutions scaled by {args.res_scale}")
    timing = {"budget_s": args.budget, "retries": args.retries}
    cases = (Case(*spec[:4], device, *spec[4:]) for spec in case_specs(args, device))
    return H.run_cases("conv_transpose" + ("_sweep" if args.sweep else ""), args, env, ceilings, notes, cases,
                       lambda case: measure(case, factories, ceilings, timing),
                       lambda row: H.describe_row(f"{row['case']} {row['mode']}", row))

if __name__ == "__main__":
    sys.exit(main())
