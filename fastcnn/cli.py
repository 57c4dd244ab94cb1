"""The ``fastcnn`` command: ``train``, ``verify``, ``bench``, ``cam`` and ``info``.

Every subcommand runs on the built-in digits data unless ``--data`` names a MedMNIST ``.npz`` file or a folder of
class folders, on the GPU when one is present (``--device`` overrides).

Every failure a user can cause (an argument, a path, the data, a checkpoint, the device or a forced backend) is one
``fastcnn <command>: error: ...`` line on stderr and exit status 2; anything else is a bug: one line too, exit status
1, and ``FASTCNN_DEBUG=1`` shows its traceback. ``verify`` exits with 1 when parity fails; Ctrl-C exits with 130
(``train`` names the checkpoint to ``--resume`` from).
"""
import argparse
import os
import shlex
import sys

DEFAULT_MODEL = "vgg11"


def _device(name):
    """The device to run on, checked now rather than at the first tensor moved there: it must exist here, and a
    backend forced with FASTCNN_BACKEND must be able to run on it (fastcnn.ops would refuse mid-run)."""
    import torch

    from .ops import BACKENDS, why_unavailable

    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available here (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name!r}: fastcnn runs on cpu or cuda")
    forced = os.environ.get("FASTCNN_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"FASTCNN_BACKEND={forced!r} is not a backend; use one of {', '.join(BACKENDS)}")
        reason = why_unavailable(forced, device.type)
        if reason:
            raise ValueError(f"FASTCNN_BACKEND={forced} cannot run on {device.type}: {reason}; unset it or pick "
                             "another (`fastcnn info` lists what runs here)")
    return name


def _add_data_options(parser):
    group = parser.add_argument_group("data")
    group.add_argument("--data", default="digits", help="'digits' (scikit-learn's 1,797 handwritten digits, built in;"
                       " the default), a MedMNIST .npz file (its train/val splits) or a folder with one sub-folder "
                       "per class (split 42,000/16,954-style, the lecture's fraction)")
    group.add_argument("--image-size", type=int, default=32, help="resize images to this height and width, "
                       ".npz files included (32)")
    group.add_argument("--channels", type=int, choices=(1, 3), default=3,
                       help="convert images to 1 (grayscale) or 3 (RGB) channels (3); with 1, the model's first "
                       "layer takes one channel")
    group.add_argument("--skip-bad-images", action="store_true", help="image folders: leave out files that do not "
                       "decode (default: list them and stop before training)")
    group.add_argument("--batch-size", type=int, default=32, help="training batch size (32)")
    group.add_argument("--drop-last", action="store_true", help="drop the last, smaller training batch")
    group.add_argument("--workers", type=int, default=0, help="data loader worker processes (0: main process)")
    group.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the shuffling (0)")


def _add_model_options(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=DEFAULT_MODEL, help=f"zoo model name (default {DEFAULT_MODEL}); "
                       "`python -c 'import fastcnn; print(fastcnn.models.list_models())'` lists them")
    group.add_argument("--width", type=float, default=None,
                       help="channel multiplier of VGG and ResNet models (e.g. 0.25 for a quick CPU run; default: "
                       "the paper's)")
    group.add_argument("--hidden-features", type=int, default=None,
                       help="width of VGG's two hidden Linear layers (default 4096 x width)")
    group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    group.add_argument("--precision", choices=("32", "bf16-mixed"), default="32",
                       help="float32, or bfloat16 autocast (CPU and GPU)")
    group.add_argument("--channels-last", action="store_true", help="models and inputs in channels_last")


def _add_optimizer_options(parser, choices, default_lr):
    group = parser.add_argument_group("optimization")
    group.add_argument("--epochs", type=int, default=4, help="training epochs (4)")
    group.add_argument("--optimizer", choices=choices, default="sgd", help="optimizer (sgd)")
    group.add_argument("--lr", type=float, default=default_lr, help=f"(peak) learning rate ({default_lr})")
    group.add_argument("--momentum", type=float, default=0.9, help="SGD/LARS momentum (0.9)")
    group.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (0)")


def build_parser():
    parser = argparse.ArgumentParser(prog="fastcnn", description="fastcnn: fused CNN kernels for PyTorch. "
                                     "Train, verify fused against stock PyTorch, benchmark, explain with CAM.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    verify = commands.add_parser("verify", help="train the fused and the stock model in lockstep; parity + speed",
                                 description="Builds --model fused and stock from the same weights, trains both on "
                                 "the same batches with fastcnn.optim and torch.optim, prints the parity report (per-"
                                 "step loss difference, parameter difference, pass/fail by fastcnn.train.tolerances),"
                                 " both validation accuracies and the speed comparison. Exit status 1 on FAIL.")
    _add_data_options(verify)
    _add_model_options(verify)
    _add_optimizer_options(verify, ("sgd", "adam", "adamw", "adagrad"), 0.01)
    verify.add_argument("--schedule", choices=("constant", "step", "cosine", "cyclic"), default="cosine",
                        help="learning-rate schedule over the run's steps, the same for both models (cosine)")
    verify.add_argument("--window", type=int, default=None,
                        help="steps over which parity is judged (default: fastcnn.train.tolerances.PARITY_WINDOW)")
    verify.add_argument("--no-progress", action="store_true", help="no progress bar (the report is printed either "
                        "way)")

    train = commands.add_parser("train", help="train one model with the Trainer", description="Trains --model "
                                "(fused unless --stock) with checkpoints, CSV/JSON logs and PNG curves in --out. "
                                "Under torchrun (e.g. `torchrun --nproc-per-node=2 -m fastcnn train`) it trains "
                                "with DistributedDataParallel (gloo on CPU, NCCL on GPU), --batch-size per process, "
                                "a DistributedSampler and exact validation over unpadded shards.")
    _add_data_options(train)
    _add_model_options(train)
    _add_optimizer_options(train, ("sgd", "adam", "adamw", "adagrad", "lars"), 0.01)
    group = train.add_argument_group("training")
    group.add_argument("--stock", action="store_true", help="train the stock (fused=False) model instead")
    group.add_argument("--schedule", choices=("constant", "step", "cosine", "cyclic", "poly"), default="cosine",
                       help="learning-rate schedule, stepped per epoch (cosine; see fastcnn.train.schedules)")
    group.add_argument("--warmup", type=int, default=0, help="warmup epochs of cosine/poly (0)")
    group.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this")
    group.add_argument("--accumulate", type=int, default=1, help="batches per optimizer step (1)")
    group.add_argument("--deterministic", action="store_true", help="deterministic algorithms only")
    group.add_argument("--sync-bn", action="store_true", help="under torchrun: BatchNorm statistics over all "
                       "processes (fastcnn.train.sync_batchnorm, also on CPU/gloo)")
    group.add_argument("--out", default="fastcnn-run", help="folder for last.pt, log.csv/json and plots (created; "
                       "an existing last.pt is overwritten)")
    group.add_argument("--resume", default=None, help="checkpoint to continue from (its next epoch), e.g. the "
                       "last.pt of an interrupted run")
    group.add_argument("--no-progress", action="store_true", help="no progress bar; the per-epoch metric lines "
                       "are printed either way")

    bench = commands.add_parser("bench", help="speed of fused vs stock training steps", description="Built in: "
                                "times --steps training steps of --model fused (as routed: stock where fastcnn "
                                "measured slower) and stock on random batches, interleaved step by step, and prints "
                                "images/s and the median per-step ratio. With --suite NAME, runs "
                                "benchmarks/bench_NAME.py of a source checkout instead (the benchmark scripts are not "
                                "installed with the package).")
    _add_model_options(bench)
    bench.add_argument("--batch-size", type=int, default=32, help="batch size (32)")
    bench.add_argument("--image-size", type=int, default=32, help="input height and width (32)")
    bench.add_argument("--steps", type=int, default=10, help="timed steps per model (10)")
    bench.add_argument("--suite", default=None, help="run benchmarks/bench_SUITE.py from the checkout, e.g. "
                       "conv_block or optim; extra arguments after -- go to it")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    cam = commands.add_parser("cam", help="Grad-CAM heatmap of a validation image as PNG",
                              description="Grad-CAM of --model (optionally loaded from --checkpoint) at --layer "
                              "(default: the last convolution) for validation image --index. The PNG shows the "
                              "image, the heatmap with its colour bar and the overlay side by side. Any layer of the "
                              "fused model can be named, also one inside a fused block (e.g. layer4.1.conv2); its "
                              "map is the stock model's. A layer whose output is 1x1 at this --image-size gets a "
                              "warning naming a larger one.")
    _add_data_options(cam)
    _add_model_options(cam)
    # The shared groups carry options that cam, reading one image in float32, would ignore: they default to unset
    # (hidden from cam's help) and cam_command refuses any that is given instead of silently ignoring it. (Not
    # cam.set_defaults: argparse would store the SUPPRESS string itself and convert it with the option's type.)
    for action in cam._actions:
        if action.dest in CAM_IGNORED_OPTIONS:
            action.default = action.help = argparse.SUPPRESS
    cam.add_argument("--checkpoint", default=None, help="a checkpoint of `fastcnn train` (its model is loaded)")
    cam.add_argument("--layer", default=None, help="module name to explain, as in model.named_modules() (default: "
                     "the last Conv2d)")
    cam.add_argument("--index", type=int, default=0, help="validation image index (0)")
    cam.add_argument("--target", type=int, default=None, help="class to explain (default: the predicted one)")
    cam.add_argument("--out", default="cam.png", help="output PNG (cam.png)")

    commands.add_parser("info", help="what was built and which backend serves each op here",
                        description="The same as `python -m fastcnn.info`.")
    return parser


def _check_positive(parser, args, *names):
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")


_FLAT_MODELS = ("mlp", "logistic_regression")  # they flatten (channels, size, size): told the shape, not adapted


def _model_kwargs(args, num_classes):
    """The zoo factory's arguments from the options; an option the model has no use for is an error, not dropped."""
    from .models import list_models

    name = args.model.lower()
    if name not in list_models():
        raise ValueError(f"unknown model {args.model!r}; available models: {', '.join(list_models())}")
    if name == "encoder_decoder":
        raise ValueError("--model encoder_decoder is a segmentation model; the fastcnn command trains classifiers "
                         "(train it with fastcnn.train.Trainer on fastcnn.data.segmentation)")
    kwargs = {"num_classes": num_classes}
    if name in _FLAT_MODELS:
        kwargs["in_shape"] = (getattr(args, "channels", 3), args.image_size, args.image_size)
    if args.width is not None:
        if not name.startswith(("vgg", "resnet")):
            raise ValueError(f"--width applies to VGG and ResNet models; {name} has none")
        kwargs["width"] = args.width
    if args.hidden_features is not None:
        if not name.startswith("vgg"):
            raise ValueError(f"--hidden-features applies to VGG models; {name} has no such layers")
        kwargs["hidden_features"] = args.hidden_features
    return kwargs


def _build_model(args, num_classes, fused=True):
    """The zoo model of the options, its first layer fitted to --channels."""
    from .models import get_model

    model = get_model(args.model, fused=fused, **_model_kwargs(args, num_classes))
    channels = getattr(args, "channels", 3)
    if args.model.lower() not in _FLAT_MODELS:
        _fit_first_conv(model, channels, args.model)
    return model


def _fit_first_conv(model, channels, name):
    """The zoo's CNNs take 3 channels; for 1 the first convolution keeps its first input channel's filters. Kaiming
    fan_out init does not depend on the input channels, so these are the filters a 1-channel build would draw; the
    state_dict keys stay, only that weight's shape changes."""
    import torch
    import torch.nn as nn

    conv = next((module for module in model.modules() if isinstance(module, nn.Conv2d)), None)
    if conv is None or conv.in_channels == channels:
        return
    if conv.in_channels != 3 or conv.groups != 1:
        raise ValueError(f"--channels {channels}: {name}'s first layer takes {conv.in_channels} channels and cannot "
                         "be adapted; use --channels 3")
    with torch.no_grad():  # in place: a fused module sharing this Parameter follows
        conv.weight.set_(conv.weight[:, :channels].clone())
    conv.in_channels = channels


def _loaders(args, device, distributed=False):
    from .data import load_dataset, make_loader

    try:
        train, val = load_dataset(args.data, args.image_size, args.channels, args.seed,
                                  skip_bad_images=getattr(args, "skip_bad_images", False),
                                  progress=not getattr(args, "no_progress", False))
    except KeyError as error:  # an .npz file without the arrays of a split
        raise ValueError(error.args[0]) from None
    base = getattr(train, "dataset", train)
    if getattr(base, "labels_per_image", 1) > 1:
        raise ValueError(f"--data {args.data} is multi-label ({base.labels_per_image} labels per image); the "
                         "fastcnn command trains single-label classifiers")
    if getattr(base, "skipped", None):
        print(f"fastcnn {args.command}: warning: skipping {len(base.skipped)} unreadable images of {args.data} "
              f"(--skip-bad-images); {len(base)} remain", file=sys.stderr)
    num_classes = len(base.classes) if getattr(base, "classes", None) else int(max(int(y) for _, y in val)) + 1
    if distributed:
        from .train.distributed import distributed_loaders

        return (*distributed_loaders(train, val, args.batch_size, seed=args.seed, drop_last=args.drop_last,
                                     num_workers=args.workers, device=device), num_classes)
    return (make_loader(train, args.batch_size, shuffle=True, drop_last=args.drop_last, num_workers=args.workers,
                        device=device),
            make_loader(val, 256, num_workers=args.workers, device=device), num_classes)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_positive(parser, args, "epochs", "lr", "batch_size", "image_size", "width", "hidden_features", "steps",
                    "window", "accumulate")
    prog = f"fastcnn {args.command}"
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    except USER_ERRORS as error:
        hint = f" (pip install {error.name})" if isinstance(error, ModuleNotFoundError) and error.name else ""
        parser.exit(2, f"{prog}: error: {' '.join(str(error).split())}{hint}\n")
    except Exception as error:
        if os.environ.get("FASTCNN_DEBUG") == "1":
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else "(no message)"
        parser.exit(1, f"{prog}: error: unexpected {type(error).__name__}: {first} (a bug? FASTCNN_DEBUG=1 shows "
                    "the traceback)\n")


# What a user can cause and fix: bad options, paths, data, checkpoints (fastcnn.train.model_state.CheckpointError
# is a ValueError), the device or a missing optional package. Anything else is reported as unexpected.
USER_ERRORS = (ValueError, OSError, ModuleNotFoundError)


def verify_command(args):
    import torch

    from .train.tolerances import PARITY_WINDOW
    from .train.verify import verify

    device = _device(args.device)
    _model_kwargs(args, 1)  # the model options, checked before the data is read
    torch.manual_seed(args.seed)
    train_loader, val_loader, num_classes = _loaders(args, device)
    hyper = {"lr": args.lr, "weight_decay": args.weight_decay}
    if args.optimizer == "sgd":
        hyper["momentum"] = args.momentum
    print(f"verify: {args.model} fused vs stock on {args.data} ({len(train_loader.dataset)} train / "
          f"{len(val_loader.dataset)} validation images, {num_classes} classes), {device}, {args.optimizer} "
          f"lr {args.lr} ({args.schedule}), {args.epochs} epochs, precision {args.precision}")
    stock = _build_model(args, num_classes, fused=False)  # stock first: its init is the one both sides start from
    models = (_build_model(args, num_classes, fused=True), stock)
    report = verify(models, train_loader, val_loader, epochs=args.epochs, optimizer=args.optimizer,
                    precision=args.precision, device=device, channels_last=args.channels_last,
                    window=args.window or PARITY_WINDOW, schedule=args.schedule, progress=not args.no_progress,
                    **hyper)
    print(report.format())
    return 0 if report.passed else 1


def _optimizer(args, parameters):
    from . import optim

    classes = {"sgd": optim.SGD, "adam": optim.Adam, "adamw": optim.AdamW, "adagrad": optim.Adagrad,
               "lars": optim.LARS}
    hyper = {"lr": args.lr, "weight_decay": args.weight_decay}
    if args.optimizer in ("sgd", "lars"):
        hyper["momentum"] = args.momentum
    return classes[args.optimizer](parameters, **hyper)


def _check_out_folder(out):
    """--out must be, or become, a folder this process can write: checked before any data is read or epoch run."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file; it must be a folder (for last.pt, the logs and the plots)")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out!r}: {parent!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out!r}: {parent!r} is not writable")


def _report_interrupt(trainer):
    """After Ctrl-C: checkpoints are written atomically, so the last one is whole; say how to go on from it."""
    from .train.trainer import is_main_process

    if not is_main_process():
        return
    if trainer.last_checkpoint:
        print(f"fastcnn train: interrupted after {len(trainer.history)} complete epoch(s); nothing was left "
              f"half-written. To continue, rerun the same command with --resume "
              f"{shlex.quote(trainer.last_checkpoint)}", file=sys.stderr)
    else:
        print("fastcnn train: interrupted before the first checkpoint was written; nothing to resume",
              file=sys.stderr)


def train_command(args):
    from .train import Trainer, seed_everything
    from .train.schedules import build_scheduler

    distributed = "WORLD_SIZE" in os.environ  # launched by torchrun
    device = _device(args.device)
    _check_out_folder(args.out)
    if args.resume and not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume {args.resume!r}: no such checkpoint file")
    _model_kwargs(args, 1)  # the model options, checked before the data is read
    if distributed:
        from .train.distributed import init_distributed, wrap_ddp
        from .train.sync_batchnorm import convert_sync_batchnorm

        _, _, device = init_distributed()
    seed_everything(args.seed, args.deterministic)
    train_loader, val_loader, num_classes = _loaders(args, device, distributed)
    model = _build_model(args, num_classes, fused=not args.stock)
    if distributed:
        model = wrap_ddp(convert_sync_batchnorm(model) if args.sync_bn else model, device)
    optimizer = _optimizer(args, model.parameters())
    scheduler = build_scheduler(optimizer, args.schedule, total=args.epochs, warmup=args.warmup,
                                step_size=max(1, args.epochs // 3))
    trainer = Trainer(model, optimizer, train_loader, val_loader, scheduler=scheduler, device=device,
                      precision=args.precision, channels_last=args.channels_last, grad_clip=args.grad_clip,
                      accumulate=args.accumulate, checkpoint_path=os.path.join(args.out, "last.pt"),
                      log_dir=args.out, progress=not args.no_progress)
    try:
        history = trainer.fit(args.epochs, resume=args.resume)
    except KeyboardInterrupt:
        _report_interrupt(trainer)
        return 130  # 128 + SIGINT, as a shell reports it
    if history:
        print(f"done: validation accuracy {history[-1]['val_accuracy']:.4f}; checkpoint, logs and plots in "
              f"{args.out}")
    return 0


def bench_command(args):
    from . import bench

    if args.suite:
        return bench.run_suite(args.suite, args.rest)
    return bench.interleaved_steps(args, _device(args.device), _model_kwargs(args, 10))


# Options of the shared data/model groups that cam does not use: it reads one validation image (no batches, no
# loader workers) and explains it in float32 and the default memory format.
CAM_IGNORED_OPTIONS = ("batch_size", "drop_last", "workers", "precision", "channels_last")


def cam_command(args):
    import warnings

    from .train import load_checkpoint
    from .train.cam import DegenerateMapWarning, explain_to_png, last_conv_name, resolve_layer
    from .train.model_state import load_model_state

    given = [f"--{name.replace('_', '-')}" for name in CAM_IGNORED_OPTIONS if hasattr(args, name)]
    if given:
        raise ValueError(f"{', '.join(given)}: not used by cam (it explains one validation image in float32); "
                         "leave them out")
    device = _device(args.device)
    unused_by_cam = argparse.Namespace(**vars(args), batch_size=1, drop_last=False, workers=0)
    _, val_loader, num_classes = _loaders(unused_by_cam, device)
    if args.target is not None and not 0 <= args.target < num_classes:
        raise ValueError(f"--target must be a class in [0, {num_classes}) (--data {args.data} has {num_classes} "
                         f"classes), got {args.target}")
    model = _build_model(args, num_classes)
    if args.checkpoint:
        load_model_state(model, load_checkpoint(args.checkpoint, required=("model",))["model"], args.checkpoint)
    try:
        layer = resolve_layer(model, args.layer)[0] if args.layer else last_conv_name(model)
    except ValueError as error:
        raise ValueError(f"--layer: {error}") from None
    dataset = val_loader.dataset
    if not 0 <= args.index < len(dataset):
        raise ValueError(f"--index must be in [0, {len(dataset)}), got {args.index}")
    image, label = dataset[args.index]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DegenerateMapWarning)
        target = explain_to_png(model.to(device).eval(), image.to(device), args.out, layer=layer,
                                target=args.target)
    for warning in caught:  # one line each, like the errors, rather than the warnings module's file:line format
        print(f"fastcnn cam: warning: {warning.message}", file=sys.stderr)
    print(f"Grad-CAM of class {target} (label {int(label)}) at {layer} written to {args.out}")
    return 0


def info_command(args):
    from .info import report

    print(report())
    return 0


COMMANDS = {"verify": verify_command, "train": train_command, "bench": bench_command, "cam": cam_command,
            "info": info_command}
