"""Fused ResNet Bottleneck blocks (fastcnn.nn.Bottleneck) against torchvision's, on ResNet-50's layer1/layer2 shapes.

Modes: "infer" = eval-mode forward under torch.no_grad (each BatchNorm a per-channel map computed at every forward, applied in the pass after its convolution); "train" =
train-mode forward + backward (batch statistics, running-statistics update, gradients of the input and every
parameter). Providers: torchvision's Bottleneck eager (cudnn.benchmark on GPU), torch.compile of it (default mode),
and fastcnn's Bottleneck (same state_dict) on each compiled backend that runs on the device. Every provider is
checked against a float64 copy of the block in the same run (_harness.check); saved-activation bytes (and, on GPU,
peak memory) of each training step are recorded.

    python benchmarks/bench_residual.py [--device cpu|cuda] [--quick] [--batch N] [--res-scale F] [--budget S]
        [--out DIR]
"""
import copy
import os
import sys

import torch
from torchvision.models import resnet as tv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import fastcnn  # noqa: E402

OP = "bottleneck(conv1x1+bn+relu, conv3x3+bn+relu, conv1x1+bn, +identity, relu)"
LAYERS = [("layer1", 256, 64, 56), ("layer2", 512, 128, 28)]  # (name, in/out channels, width, resolution)
LAYOUT = {"cuda": (torch.bfloat16, torch.channels_last), "cpu": (torch.float32, torch.channels_last)}
DEFAULT_BATCH = {"cuda": 64, "cpu": 2}
MODES = ("infer", "train")


class Case:
    """One layer x mode: torchvision's block, fastcnn's with the same state_dict, the input and the float64 oracle."""

    def __init__(self, name, channels, width, res, batch, mode, device):
        torch.manual_seed(0)
        dtype, fmt = LAYOUT[device.type]
        stock = tv.Bottleneck(channels, width)
        with torch.no_grad():  # non-trivial BatchNorm state, as in a trained network
            for bn in (m for m in stock.modules() if isinstance(m, torch.nn.BatchNorm2d)):
                bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.2)
                bn.running_mean.normal_(0, 0.2), bn.running_var.uniform_(0.5, 2)
        fused = fastcnn.nn.Bottleneck(channels, width)
        fused.load_state_dict(stock.state_dict())
        self.train = mode == "train"
        self.oracle = copy.deepcopy(stock).double().train(self.train)
        self.stock = stock.to(device, dtype, memory_format=fmt).train(self.train)
        self.fused = fused.to(device, dtype, memory_format=fmt).train(self.train)
        self.x = torch.randn(batch, channels, res, res, device=device, dtype=dtype).to(memory_format=fmt)
        self.x.requires_grad_(self.train)
        self.grad_out = torch.randn_like(self.x)
        self.device, self.dtype, self.mode = device, dtype, mode
        self.meta = {"op": OP, "block": name, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
                     "layout": "channels_last", "shape": {"N": batch, "C": channels, "width": width, "H": res,
                                                          "W": res}}
        self.reference = self.step(self.oracle, self.oracle, self.x.detach().double(), self.grad_out.double())()

    def step(self, run, block, x=None, grad_out=None):
        """A callable running one step of ``run`` (the block itself, or a wrapper of it) and returning what is
        checked: the output, and in training the input gradient and ``checked_grads(block)``."""
        x = self.x if x is None else x.requires_grad_(self.train)
        grad_out = self.grad_out if grad_out is None else grad_out
        if not self.train:
            def infer():
                with torch.no_grad():
                    return (run(x),)
            return infer

        def train_step():
            x.grad = None
            block.zero_grad(set_to_none=True)
            out = run(x)
            out.backward(grad_out)
            return (out.detach(), x.grad, *self.checked_grads(block))
        return train_step

    @staticmethod
    def checked_grads(block):
        """The parameter gradients the correctness check compares (a sample: one per convolution, two BN)."""
        return (block.conv1.weight.grad, block.conv2.weight.grad, block.conv3.weight.grad, block.bn1.weight.grad,
                block.bn3.bias.grad)

    def work(self):
        """(FLOPs, bytes) of an ideal implementation: the three convolutions (x3 in training for dgrad and wgrad);
        bytes = block input, output and weights once (training: also grad_out, grad_input and one re-read)."""
        s = self.meta["shape"]
        pixels = s["N"] * s["H"] * s["W"]
        flops = 2 * pixels * (s["C"] * s["width"] + 9 * s["width"] ** 2 + s["width"] * s["C"])
        item = self.x.element_size()
        weights = sum(p.numel() for p in self.stock.parameters()) * item
        io = 2 * self.x.numel() * item + weights
        return (3 * flops, 2 * io + 2 * self.x.numel() * item) if self.train else (flops, io)


def providers(device):
    """[(name, factory(case) -> (callable, the block whose parameters it trains))], eager first, and notes."""
    found = [("eager", lambda case: (case.stock, case.stock)),
             ("compile", lambda case: (torch.compile(case.stock), case.stock))]
    notes = []
    # The device's compiled backends (Triton is timed on GPUs only: on CPU it runs only under its interpreter).
    for backend in ("cuda", "triton") if device.type == "cuda" else ("cpu",):
        reason = fastcnn.ops.why_unavailable(backend, device.type)
        if reason is None:
            found.append((f"fastcnn[{backend}]", lambda case, b=backend: (H.WithBackend(case.fused, b), case.fused)))
        else:
            notes.append(f"fastcnn[{backend}] not benchmarked: {reason}")
    # What a user gets: each op's route and the block's module route (fastcnn/nn/residual.py, inception.py ROUTES),
    # which may send the whole block to its stock layers where the fused block measured slower.
    found.append(("fastcnn", lambda case: (case.fused, case.fused)))
    notes.append("the reference backend is plain PyTorch (not timed); fastcnn = the routed default")
    return found, notes


def provider_steps(case, factory):
    """(what runs the block, the step whose outputs are checked, the timed step) of one provider."""
    run, block = factory(case)
    return run, case.step(run, block), case.step(run, block)


def case_specs(args, device):
    """The Case constructor arguments (less the device) of a run, in run order."""
    batch = args.batch or DEFAULT_BATCH[device.type]
    return [(name, channels, width, max(2, round(res * args.res_scale)), batch, mode)
            for name, channels, width, res in LAYERS for mode in MODES]


def measure(case, factories, ceilings, timing):
    flops, nbytes = case.work()
    row = dict(case.meta, flops=flops, bytes=nbytes, providers={}, ratios={})
    stock_out, timed = None, {}
    for name, factory in factories:
        torch._dynamo.reset()
        run, checked, timed[name] = provider_steps(case, factory)
        got, result = H.checked_first_call(checked, stock_out, case.reference, case.dtype, case.device)
        stock_out = stock_out or got
        if case.train:
            params = list(case.stock.parameters()) + list(case.fused.parameters())
            result["saved_bytes"] = H.saved_tensor_bytes(lambda: run(case.x), held=[case.x, *params])
            result["peak_step_bytes"] = H.peak_step_bytes(timed[name], lambda: None, case.device)
        row["providers"][name] = result
    H.time_providers(row, timed, case.device, timing, (flops, nbytes), ceilings, case.dtype)
    return H.finish_row(row)


def _saved(result):
    return f", saved {result['saved_bytes']['activations'] / 2**20:.1f} MiB" if "saved_bytes" in result else ""


def main(argv=None):
    args = H.layer_suite_args(__doc__, "64 on GPU, 2 on CPU", argv)
    device, env, ceilings = H.begin_run(args, LAYOUT[args.device][0])
    factories, notes = providers(device)
    if args.res_scale != 1.0:
        notes.append(f"resolutions scaled by {args.res_scale} from ResNet-50's")
    timing = {"budget_s": args.budget, "retries": args.retries}
    cases = (Case(*spec, device) for spec in case_specs(args, device))
    return H.run_cases("residual", args, env, ceilings, notes, cases,
                       lambda case: measure(case, factories, ceilings, timing),
                       lambda row: H.describe_row(f"{row['block']} {row['mode']} {row['shape']}", row, _saved))

if __name__ == "__main__":
    sys.exit(main())
