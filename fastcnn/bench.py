"""``fastcnn bench``: fused against stock training steps, timed interleaved, or a benchmark suite of the source
checkout (`run_suite`)."""
import os
import statistics
import subprocess
import sys
import time

import torch

from .train.verify import model_pair, optimizer_pair


def run_suite(suite, rest):
    """Run benchmarks/bench_<suite>.py of the source checkout this package was loaded from."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          f"bench_{suite}.py")
    if not os.path.isfile(script):
        raise FileNotFoundError(f"--suite {suite!r}: {script} not found (benchmark scripts exist only in a source "
                                "checkout)")
    return subprocess.call([sys.executable, script, *[a for a in rest if a != "--"]])


def interleaved_steps(args, device, kwargs):
    """``fastcnn bench`` without --suite: --steps SGD training steps of --model fused (as routed) and stock on one
    random batch, interleaved step by step with the order alternating, so a drift of the machine's speed lands on
    both alike; prints each one's images/s and the median of the per-step paired ratios."""
    fused, stock = model_pair(args.model, **kwargs)
    optimizers = optimizer_pair("sgd", fused.parameters(), stock.parameters(), lr=0.01, momentum=0.9)
    inputs = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    targets = torch.randint(0, 10, (args.batch_size,), device=device)
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16, enabled=args.precision == "bf16-mixed")
    sides = {"fused": (fused.to(device).train(), optimizers[0]), "stock": (stock.to(device).train(), optimizers[1])}

    def step(name):
        model, optimizer = sides[name]
        start = time.perf_counter()
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # synchronises, so the time includes the whole step
        return time.perf_counter() - start

    for name in sides:  # warm-up (allocations, kernel selection)
        step(name)
    seconds = {name: [] for name in sides}
    for i in range(args.steps):
        for name in (("fused", "stock") if i % 2 else ("stock", "fused")):
            seconds[name].append(step(name))
    for name in sides:
        rate = args.batch_size / statistics.median(seconds[name])
        print(f"{name}: {rate:.1f} images/s ({args.model}, batch {args.batch_size}, {args.image_size} px, "
              f"{device}, precision {args.precision})")
    paired = statistics.median(s / f for s, f in zip(seconds["stock"], seconds["fused"]))
    print(f"fused is {paired:.2f}x stock (median of {args.steps} interleaved step pairs)")
    return 0
