"""Fused Conv2d 3x3 + BatchNorm2d + ReLU + 2x2 max-pool (fastcnn.nn.ConvBNReLUPool2d with its FusedBatchNorm2d)
against torchvision's VGG-16-BN layers, on the conv that ends each VGG-16 block.

Modes: "infer" = eval-mode forward under torch.no_grad (the convolution, then BatchNorm as a per-channel
map computed at every forward + ReLU in one pass, then the pool); "train" = train-mode forward + backward (batch statistics, running-statistics update,
gradients of the input and every parameter). Providers: the stock ``Sequential(Conv2d, BatchNorm2d, ReLU(inplace),
MaxPool2d)`` eager (cudnn.benchmark on GPU), torch.compile of it (default mode), and the fused layers (same
state_dict) on each compiled backend that runs on the device. Every provider is checked against a float64 copy in
the same run (_harness.check); saved-activation bytes (and, on GPU, peak memory) of each training step are recorded.
Cases, timing and checks are bench_residual.py's; only the layers differ.

    python benchmarks/bench_conv_bn.py [--device cpu|cuda] [--quick] [--batch N] [--res-scale F] [--budget S]
        [--out DIR]
"""
import copy
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402
import bench_residual as residual  # noqa: E402

from fastcnn.nn.sequential_fusion import fuse_sequential  # noqa: E402

OP = "conv3x3+bn+relu+maxpool2x2"
BLOCKS = [("block1", 64, 224), ("block2", 128, 112), ("block3", 256, 56), ("block4", 512, 28), ("block5", 512, 14)]


class Case(residual.Case):
    """One VGG-16-BN block x mode: the stock layers, fastcnn's fused layers with the same state_dict, the input and
    the float64 oracle."""

    def __init__(self, name, channels, res, batch, mode, device):
        torch.manual_seed(0)
        dtype, fmt = residual.LAYOUT[device.type]
        stock = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels),
                              nn.ReLU(inplace=True), nn.MaxPool2d(2))
        with torch.no_grad():  # non-trivial BatchNorm state, as in a trained network
            stock[1].weight.uniform_(0.5, 1.5), stock[1].bias.normal_(0, 0.2)
            stock[1].running_mean.normal_(0, 0.2), stock[1].running_var.uniform_(0.5, 2)
        self.train = mode == "train"
        self.oracle = copy.deepcopy(stock).double().train(self.train)
        self.stock = stock.to(device, dtype, memory_format=fmt).train(self.train)
        self.fused = fuse_sequential(copy.deepcopy(self.stock)).train(self.train)
        self.x = torch.randn(batch, channels, res, res, device=device, dtype=dtype).to(memory_format=fmt)
        self.x.requires_grad_(self.train)
        self.grad_out = torch.randn(batch, channels, res // 2, res // 2, device=device, dtype=dtype)
        self.grad_out = self.grad_out.to(memory_format=fmt)
        self.device, self.dtype, self.mode = device, dtype, mode
        self.meta = {"op": OP, "block": name, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
                     "layout": "channels_last", "shape": {"N": batch, "C": channels, "H": res, "W": res}}
        self.reference = self.step(self.oracle, self.oracle, self.x.detach().double(), self.grad_out.double())()

    @staticmethod
    def checked_grads(layers):
        """The conv weight's and the BatchNorm's gradients. (Not the conv bias's: BatchNorm cancels it, so its
        gradient is exactly zero in the fused layers and rounding residue around zero in stock's.)"""
        return (layers[0].weight.grad, layers[1].weight.grad, layers[1].bias.grad)

    def work(self):
        """(FLOPs, bytes) of an ideal implementation: the convolution (x3 in training for dgrad and wgrad); bytes =
        input, weights and pooled output once (training: also grad_out, grad_input, and the input re-read)."""
        s = self.meta["shape"]
        flops = 2 * s["N"] * s["H"] * s["W"] * 9 * s["C"] ** 2
        item = self.x.element_size()
        weights = sum(p.numel() for p in self.stock.parameters()) * item
        io = self.x.numel() * item + weights + self.grad_out.numel() * item
        return (3 * flops, 2 * io + 2 * self.x.numel() * item) if self.train else (flops, io)


def providers(device):
    """bench_residual's providers less Triton: the training-mode BatchNorm + ReLU + pool op has no Triton kernel."""
    found, notes = residual.providers(device)
    if any(name == "fastcnn[triton]" for name, _ in found):
        notes.append("fastcnn[triton] not benchmarked: the fused training-mode BatchNorm + ReLU + pool has no Triton "
                     "kernel")
    return [(name, factory) for name, factory in found if name != "fastcnn[triton]"], notes


def case_specs(args, device):
    """The Case constructor arguments (less the device) of a run, in run order."""
    batch = args.batch or residual.DEFAULT_BATCH[device.type]
    return [(name, channels, max(2, round(res * args.res_scale)), batch, mode)
            for name, channels, res in BLOCKS for mode in residual.MODES]


def main(argv=None):
    args = H.layer_suite_args(__doc__, "64 on GPU, 2 on CPU", argv)
    device, env, ceilings = H.begin_run(args, residual.LAYOUT[args.device][0])
    factories, notes = providers(device)
    if args.res_scale != 1.0:
        notes.append(f"resolutions scaled by {args.res_scale} from VGG-16's")
    timing = {"budget_s": args.budget, "retries": args.retries}
    cases = (Case(*spec, device) for spec in case_specs(args, device))
    return H.run_cases("conv_bn_block", args, env, ceilings, notes, cases,
                       lambda case: residual.measure(case, factories, ceilings, timing),
                       lambda row: H.describe_row(f"{row['block']} {row['mode']} {row['shape']}", row,
                                                  residual._saved))


if __name__ == "__main__":
    sys.exit(main())
