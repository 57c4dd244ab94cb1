"""Whole-model steps of the zoo's ResNet-50, VGG-16 and encoder-decoder: inference forward and a training step,
fastcnn's fused models against the same models built stock, eager and under torch.compile.

Modes: "inference" = eval-mode forward under torch.inference_mode; "train" = train-mode forward, loss, backward and
an SGD-momentum step (the same torch.optim.SGD for every provider). The loss is cross-entropy for the classifiers;
for ``encoder_decoder`` (VGG-11 encoder, fused transposed-convolution decoder, segmentation and classification
heads; ``--width`` narrows it) it is MultiTaskLoss (pixel and image cross-entropy plus soft Dice) against random
masks and labels.
Providers: "eager" = ``fastcnn.models.<name>(fused=False)``, module for module torchvision's model (tests/models
checks keys, init and outputs against torchvision); "compile" = torch.compile of it; "fastcnn" = the fused model
(``fused=True``) holding the same weights; "fastcnn+compile" = torch.compile of the fused model.
Correctness in the same run: before timing, each provider's logits (and, in train mode, loss and the gradients of
the first conv and the last Linear weight) are checked against the stock model in float64 with the same weights
and dropout masks (_harness.check: at most 2x eager's error); the encoder-decoder's check covers both heads'
logits and the gradients of every transposed convolution too. Memory: bytes saved for backward by a training
forward, and the peak allocated during a training step (GPU only).

    python benchmarks/bench_models.py [--device cpu|cuda] [--quick] [--models resnet50,vgg16]
        [--modes inference,train] [--batch N] [--resolution R] [--width W] [--dtype float32|bfloat16]
        [--channels-last] [--no-compile] [--budget S] [--retries N] [--wait-quiet S] [--suite NAME] [--out DIR]
"""
import argparse
import copy
import functools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import fastcnn  # noqa: E402
from fastcnn.nn.multitask_loss import MultiTaskLoss  # noqa: E402

NUM_CLASSES = 1000
# --quick: a smoke run at the CPU default size (smaller, ResNet-50's last BatchNorms see too few values per channel
# in training: at 2 x 32², 2 each, and float32 vs float64 differ by ~100% in eager too)
QUICK = {"models": "resnet50", "batch": 2, "resolution": 64}
DEFAULTS = {"cpu": {"batch": 2, "resolution": 64, "width": 0.25}, "cuda": {"batch": 64, "resolution": 224, "width": 1}}


class Case:
    """One model x mode x input: the stock model (never run itself: providers get copies), its float64 oracle, the
    input and the labels."""

    num_classes = NUM_CLASSES

    def __init__(self, name, mode, batch, resolution, dtype, channels_last, device):
        torch.manual_seed(0)
        self.name, self.mode, self.dtype, self.device = name, mode, dtype, device
        self.stock = fastcnn.models.get_model(name, fused=False, **self.model_kwargs())
        self.oracle = copy.deepcopy(self.stock).double().to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.stock = self.stock.to(device=device, dtype=dtype, memory_format=fmt)
        self.x = torch.randn(batch, 3, resolution, resolution).to(device=device, dtype=dtype, memory_format=fmt)
        self.labels = torch.randint(0, self.num_classes, (batch,), device=device)
        self.meta = {"model": name, "mode": mode, "batch": batch, "resolution": resolution,
                     "dtype": str(dtype).replace("torch.", ""), "layout": "channels_last" if channels_last else "nchw"}

    @functools.cached_property
    def reference(self):
        """The float64 oracle's checked tensors (``checked_tensors``) on the same input."""
        return self.checked_tensors(self.oracle, self.x.double())

    def stock_copy(self):
        """A fresh copy of the stock model (a provider's timed steps update its weights and statistics)."""
        return copy.deepcopy(self.stock)

    def fused(self):
        """The fused model holding a copy of the stock model's weights and buffers."""
        model = fastcnn.models.get_model(self.name, fused=True, **self.model_kwargs())
        model.load_state_dict(self.stock.state_dict(), strict=True)
        fmt = torch.channels_last if self.meta["layout"] == "channels_last" else torch.contiguous_format
        return model.to(device=self.device, dtype=self.dtype, memory_format=fmt)

    def model_kwargs(self):
        return {"num_classes": NUM_CLASSES}

    def loss(self, logits):
        return F.cross_entropy(logits.float(), self.labels)

    def checked_weights(self, model):
        """The weights whose gradients the check compares: the first conv's and the last layer's."""
        weights = [p for p in model.parameters() if p.dim() > 1]
        return [weights[0], weights[-1]]

    def checked_tensors(self, model, x):
        """Outputs, and in train mode the loss and the checked weight gradients, of one step of ``model`` (no
        update)."""
        model.train(self.mode == "train")
        if self.mode == "inference":
            with torch.inference_mode():
                return _as_tuple(model(x))
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks for every provider and the oracle
        outputs = model(x)
        loss = self.loss(outputs)
        loss.backward()
        return (*(t.detach() for t in _as_tuple(outputs)), loss.detach(),
                *(p.grad for p in self.checked_weights(model)))

    def step(self, model):
        """The timed callable: one inference forward, or one full training step."""
        model.train(self.mode == "train")
        if self.mode == "inference":
            def infer():
                with torch.inference_mode():
                    return model(self.x)
            return infer
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def train_step():
            optimizer.zero_grad(set_to_none=True)
            self.loss(model(self.x)).backward()
            optimizer.step()
        return train_step


class EncoderDecoderCase(Case):
    """The encoder-decoder's segmentation + classification step: a VGG-11 encoder of channel multiplier ``width``,
    the fused transposed-convolution decoder, MultiTaskLoss against random masks and labels."""

    num_classes, num_seg_classes = 3, 4

    def __init__(self, name, mode, batch, resolution, dtype, channels_last, device, width):
        self.width = width
        super().__init__(name, mode, batch, resolution, dtype, channels_last, device)
        self.masks = torch.randint(0, self.num_seg_classes, (batch, resolution, resolution), device=device)
        self.multitask_loss = MultiTaskLoss(dice_weight=0.5)
        self.meta.update(encoder="vgg11", width=width)

    def model_kwargs(self):
        return {"encoder": "vgg11", "num_classes": self.num_classes, "num_seg_classes": self.num_seg_classes,
                "width": self.width}

    def loss(self, outputs):
        seg_logits, cls_logits = (_loss_precision(t) for t in outputs)
        return self.multitask_loss(seg_logits, self.masks, cls_logits, self.labels)[0]

    def checked_weights(self, model):
        """The first conv, every transposed convolution (the decoder's upsampling) and both heads."""
        return [next(model.encoder.parameters()), *(up.weight for up in model.up), model.seg_head.weight,
                model.cls_head.weight]


def _as_tuple(outputs):
    return outputs if isinstance(outputs, tuple) else (outputs,)


def _loss_precision(t):
    """float16/bfloat16 logits go to float32 for the loss, as autocast does; float32 and the float64 oracle stay."""
    return t.float() if t.element_size() < 4 else t


def make_case(name, mode, args, defaults, dtype, device):
    """The Case of one model x mode from the command line's sizes (or the device's defaults)."""
    sizes = (args.batch or defaults["batch"], args.resolution or defaults["resolution"], dtype,
             args.channels_last, device)
    if name == "encoder_decoder":
        return EncoderDecoderCase(name, mode, *sizes, width=args.width or defaults["width"])
    return Case(name, mode, *sizes)


def providers(compile_too):
    """[(name, factory(case) -> model)]: stock eager first (its error is the yardstick)."""
    found = [("eager", lambda case: case.stock_copy()), ("fastcnn", lambda case: case.fused())]
    if compile_too:
        found[1:1] = [("compile", lambda case: torch.compile(case.stock_copy()))]
        found.append(("fastcnn+compile", lambda case: torch.compile(case.fused())))
    return found


def provider_steps(case, factory):
    """(the model, the step whose outputs are checked - no update -, the timed step) of one provider."""
    model = factory(case)
    return model, lambda: case.checked_tensors(model, case.x), case.step(model)


def measure(case, factories, timing):
    """One row: every provider checked against the float64 oracle and (train) its memory measured, then all of them
    timed against each other (interleaved on CPU, `H.bench_all`)."""
    row = dict(case.meta, providers={}, ratios={})
    stock_result, timed = None, {}
    for name, factory in factories:
        result = {}
        try:
            torch._dynamo.reset()
            model, checked, run = provider_steps(case, factory)
            got, checked_result = H.checked_first_call(checked, stock_result, case.reference, case.dtype, case.device)
            result.update(checked_result)
            stock_result = stock_result or got  # eager runs first
            if case.mode == "train":
                result["saved_bytes"] = H.saved_tensor_bytes(lambda: model(case.x),
                                                             held=[case.x, *model.parameters()])
                result["peak_step_bytes"] = H.peak_step_bytes(run, lambda: model.zero_grad(set_to_none=True),
                                                              case.device)
            timed[name] = run
        except Exception as exc:  # a provider that cannot run this case is recorded, not fatal
            if name == "eager":
                raise
            result = {"error": f"{type(exc).__name__}: {exc}"[:500], "ok": False}
        row["providers"][name] = result
    for name, result in H.bench_all(timed, case.device, warmup=1, **timing).items():
        row["providers"][name].update(result)
    _add_ratios(row)
    return row


def _add_ratios(row):
    """ratio = baseline time / fastcnn time (> 1: fastcnn faster; on CPU the median of the per-round paired ratios,
    with their spread: `H.set_ratios`), for each fastcnn provider that passed."""
    ours = [n for n in row["providers"] if n.startswith("fastcnn")]
    baselines = [n for n, r in row["providers"].items() if n not in ours and "median_ms" in r]
    for name in ours:
        H.set_ratios(row, name, baselines, row["providers"][name]["ok"])
    row["status"] = "ok" if all(row["providers"][n]["ok"] for n in ours) else "failed"


def describe(row):
    head = f"{row['model']} {row['mode']} {row['batch']}x3x{row['resolution']}² {row['dtype']} {row['layout']}:"
    parts = [f"{n} ERROR" if "median_ms" not in r else f"{n} {r['median_ms']:.1f}ms{'' if r['ok'] else ' WRONG'}"
             for n, r in row["providers"].items()]
    ratios = [f"{n} " + ", ".join(f"x{v:.2f} vs {b}" for b, v in vs.items())
              for n, vs in row["ratios"].items() if None not in vs.values()]
    return f"{head} {' | '.join(parts)}\n    {'; '.join(ratios)} [{row['status']}]"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a smoke run: ResNet-50 only (unless --models), batch "
                   f"{QUICK['batch']} at {QUICK['resolution']}² (unless --batch, --resolution), no retries")
    p.add_argument("--models", help="default: resnet50,vgg16 (resnet50 with --quick)")
    p.add_argument("--modes", default="inference,train")
    p.add_argument("--batch", type=int, help="default: 2 on CPU, 64 on GPU")
    p.add_argument("--resolution", type=int, help="default: 64 on CPU, 224 on GPU")
    p.add_argument("--width", type=float, help="encoder_decoder's channel multiplier (default: 0.25 on CPU, 1 on GPU)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile providers")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed repeats per provider")
    p.add_argument("--retries", type=int, help="default: 2 (0 with --quick)")
    p.add_argument("--wait-quiet", type=float, default=0, help="wait up to S seconds for a quiet machine first")
    p.add_argument("--suite", help="the results file's suite name (default: models, models_quick with --quick)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    quick = QUICK if args.quick else {}
    args.models = args.models or quick.get("models", "resnet50,vgg16")
    args.batch, args.resolution = args.batch or quick.get("batch"), args.resolution or quick.get("resolution")
    args.retries = (0 if args.quick else 2) if args.retries is None else args.retries
    args.suite = args.suite or ("models_quick" if args.quick else "models")
    return args


def run_dtype(args, device):
    """--dtype, or the device's default: float32 on CPU, bfloat16 on GPU."""
    return getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))


def case_specs(args):
    """(model, mode) of a run, in run order."""
    return [(name, mode) for name in args.models.split(",") for mode in args.modes.split(",")]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    defaults = DEFAULTS[device.type]
    dtype = run_dtype(args, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    waited = H.wait_for_quiet(args.wait_quiet) if args.wait_quiet else 0
    env = dict(H.environment(device), waited_for_quiet_s=waited)
    ceilings = H.measure_ceilings(device, [dtype], args.retries)
    print(H.banner(env, ceilings), flush=True)
    notes = [] if not args.no_compile else ["torch.compile providers left out (--no-compile)"]
    if device.type == "cpu":
        notes.append("peak step memory is measured on GPU only; saved_bytes (autograd's saved tensors) on both")
    timing = {"budget_s": args.budget, "min_reps": 3, "max_reps": 50, "retries": args.retries}
    rows = []
    for name, mode in case_specs(args):
        case = make_case(name, mode, args, defaults, dtype, device)
        rows.append(measure(case, providers(not args.no_compile), timing))
        print(describe(rows[-1]), flush=True)
        H.write_results(args.suite, env, ceilings, rows, args.out, notes, complete=False)  # survives a kill
    note = H.disturbed_note([r for row in rows for r in row["providers"].values() if "median_ms" in r])
    notes += [note] if note else []
    print(f"wrote {H.write_results(args.suite, env, ceilings, rows, args.out, notes)}")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
