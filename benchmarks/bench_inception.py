"""Fused Inception block (fastcnn.nn.InceptionBlock, branches stored straight into the concatenated output) against
torchvision's GoogLeNet Inception, on GoogLeNet's inception3a shape (192 -> 64 + 128 + 32 + 32 channels at 28x28).

Modes: "infer" = eval-mode forward under torch.no_grad (each BatchNorm a per-channel map computed at every forward, applied in the pass after its convolution); "train" =
train-mode forward + backward (batch statistics, running-statistics update, gradients of the input and every
parameter). Providers: torchvision's Inception eager (cudnn.benchmark on GPU), torch.compile of it (default mode),
and fastcnn's InceptionBlock (same state_dict) on each compiled backend that runs on the device. Every provider is
checked against a float64 copy of the block in the same run (_harness.check); saved-activation bytes (and, on GPU,
peak memory) of each training step are recorded (the measuring loop is bench_residual's).

    python benchmarks/bench_inception.py [--device cpu|cuda] [--quick] [--batch N] [--res-scale F] [--budget S]
        [--out DIR]
"""
import copy
import os
import sys

import torch
from torchvision.models.googlenet import Inception

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402
import bench_residual  # noqa: E402

import fastcnn  # noqa: E402

OP = "inception(1x1 | 1x1->3x3 | 1x1->3x3 | maxpool3x3->1x1, each conv+bn+relu, concatenated)"
BLOCKS = [("inception3a", (192, 64, 96, 128, 16, 32, 32), 28)]  # (name, constructor arguments, resolution)
LAYOUT = {"cuda": (torch.bfloat16, torch.channels_last), "cpu": (torch.float32, torch.channels_last)}
DEFAULT_BATCH = {"cuda": 64, "cpu": 2}


class Case(bench_residual.Case):
    """One block x mode: torchvision's Inception, fastcnn's with the same state_dict, the input and the float64
    oracle (the step and the check are the residual suite's)."""

    def __init__(self, name, arguments, res, batch, mode, device):
        torch.manual_seed(0)
        dtype, fmt = LAYOUT[device.type]
        stock = Inception(*arguments)
        with torch.no_grad():  # non-trivial BatchNorm state, as in a trained network
            for bn in (m for m in stock.modules() if isinstance(m, torch.nn.BatchNorm2d)):
                bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.2)
                bn.running_mean.normal_(0, 0.2), bn.running_var.uniform_(0.5, 2)
        fused = fastcnn.nn.InceptionBlock(*arguments)
        fused.load_state_dict(stock.state_dict())
        self.train = mode == "train"
        self.arguments = arguments
        self.oracle = copy.deepcopy(stock).double().train(self.train)
        self.stock = stock.to(device, dtype, memory_format=fmt).train(self.train)
        self.fused = fused.to(device, dtype, memory_format=fmt).train(self.train)
        channels = arguments[0]
        out_channels = arguments[1] + arguments[3] + arguments[5] + arguments[6]
        self.x = torch.randn(batch, channels, res, res, device=device, dtype=dtype).to(memory_format=fmt)
        self.x.requires_grad_(self.train)
        self.grad_out = torch.randn(batch, out_channels, res, res, device=device, dtype=dtype)
        self.device, self.dtype, self.mode = device, dtype, mode
        self.meta = {"op": OP, "block": name, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
                     "layout": "channels_last", "shape": {"N": batch, "C": channels, "C_out": out_channels,
                                                          "H": res, "W": res}}
        self.reference = self.step(self.oracle, self.oracle, self.x.detach().double(), self.grad_out.double())()

    @staticmethod
    def checked_grads(block):
        """The parameter gradients the correctness check compares: one of each branch."""
        return (block.branch1.conv.weight.grad, block.branch2[1].conv.weight.grad, block.branch3[0].bn.weight.grad,
                block.branch4[1].bn.bias.grad)

    def work(self):
        """(FLOPs, bytes) of an ideal implementation: the six convolutions (x3 in training for dgrad and wgrad);
        bytes = block input, output and weights once (training: twice, plus grad_out and grad_input)."""
        c, ch1, red3, ch3, red5, ch5, proj = self.arguments
        s = self.meta["shape"]
        pixels = s["N"] * s["H"] * s["W"]
        flops = 2 * pixels * (c * (ch1 + red3 + red5 + proj) + 9 * (red3 * ch3 + red5 * ch5))
        item = self.x.element_size()
        weights = sum(p.numel() for p in self.stock.parameters()) * item
        activations = (self.x.numel() + self.grad_out.numel()) * item
        io = activations + weights
        return (3 * flops, 2 * io + activations) if self.train else (flops, io)


def case_specs(args, device):
    """The Case constructor arguments (less the device) of a run, in run order."""
    batch = args.batch or DEFAULT_BATCH[device.type]
    return [(name, arguments, max(2, round(res * args.res_scale)), batch, mode)
            for name, arguments, res in BLOCKS for mode in bench_residual.MODES]


def main(argv=None):
    args = H.layer_suite_args(__doc__, "64 on GPU, 2 on CPU", argv)
    device, env, ceilings = H.begin_run(args, LAYOUT[args.device][0])
    factories, notes = bench_residual.providers(device)
    if args.res_scale != 1.0:
        notes.append(f"resolutions scaled by {args.res_scale} from GoogLeNet's")
    timing = {"budget_s": args.budget, "retries": args.retries}
    cases = (Case(*spec, device) for spec in case_specs(args, device))
    return H.run_cases("inception", args, env, ceilings, notes, cases,
                       lambda case: bench_residual.measure(case, factories, ceilings, timing),
                       lambda row: H.describe_row(f"{row['block']} {row['mode']} {row['shape']}", row,
                                                  bench_residual._saved))


if __name__ == "__main__":
    sys.exit(main())
