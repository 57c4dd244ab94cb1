"""The fused optimizers' CUDA kernels on the GPU: lockstep with torch.optim, LARS against its CPU kernel with tensors
of many chunks (issue 15.11: the trust ratio now sums each tensor's partials once), and the work-table cache
(issue 15.9): tables first built inside a CUDA-graph capture filled by every graph that reads them, more tables than
the cache keeps, a table used from a second stream. All `cuda`-marked."""
import pytest
import torch

import fastcnn
from fastcnn import _extension

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not _extension.WITH_CUDA, reason="fastcnn._C was built without CUDA kernels")]
ops = torch.ops.fastcnn
CHUNK = 32768  # elements per work item (csrc/include/fastcnn/multi_tensor.cuh)


def _ulps_close(result, expected, ulps=4, name=""):
    unit = torch.finfo(expected.dtype).eps * max(1.0, expected.abs().max().item())
    error = (result.double() - expected.double()).abs().max().item()
    assert error <= ulps * unit, f"{name}: differs by {error / unit:.3g} ulps"


def _params(dtype, shapes=((7, 5), (13,), (3, 4, 3, 3), (CHUNK * 2 + 3,))):
    return [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]


@pytest.mark.parametrize("name, kwargs", [("Adam", dict(lr=1e-2)), ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
                                          ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.01)),
                                          ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
                                          ("SGD", dict(lr=0.1)), ("Adagrad", dict(lr=0.1, weight_decay=0.01))],
                         ids=["adam", "adamw", "adam-amsgrad", "sgd-nesterov", "sgd-plain", "adagrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_optimizers_step_in_lockstep(name, kwargs, dtype):
    """The CUDA kernels against the CPU kernels (same per-element math, optim_math.h) and, where torch has a fused
    CUDA optimizer (Adam, AdamW, SGD), against it, over 10 steps."""
    ours = [p.clone().requires_grad_() for p in _params(dtype)]
    on_cpu = [p.detach().cpu().requires_grad_() for p in ours]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    opts = [getattr(fastcnn.optim, name)(ours, **kwargs), getattr(fastcnn.optim, name)(on_cpu, **kwargs)]
    if name != "Adagrad":
        opts.append(getattr(torch.optim, name)(theirs, **kwargs, fused=True))
    for _ in range(10):
        for a, b, c in zip(ours, on_cpu, theirs):
            g = torch.randn_like(a)
            a.grad, b.grad, c.grad = g.clone(), g.cpu(), g.clone()
        for o in opts:
            o.step()
    for i, (a, b, c) in enumerate(zip(ours, on_cpu, theirs)):
        _ulps_close(a.detach().cpu(), b.detach(), 4, f"param {i} vs the CPU kernel")
        if name != "Adagrad":
            _ulps_close(a.detach(), c.detach(), 4, f"param {i} vs torch.optim.{name}(fused=True)")


def _lars_call(params, grads, bufs, **kw):
    args = dict(lr=0.1, lr_tensor=None, momentum=0.9, dampening=0.0, weight_decay=1e-4, trust_coefficient=0.001,
                eps=1e-8, nesterov=False, maximize=False, trust_clip=False, update_norm=False, lr_in_momentum=False,
                is_first_step=False, grad_scale=None, found_inf=None)
    args.update(kw)
    ops.lars_(params, grads, bufs, *args.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", [dict(), dict(lr_in_momentum=True), dict(momentum=0.0), dict(update_norm=True)],
                         ids=["momentum", "lr_in_momentum", "plain", "update_norm"])
def test_lars_many_chunks_match_the_cpu_kernel(dtype, mode):
    """Tensors of 1, 2, 300 and 1000 chunks (issue 15.11's O(chunks^2) re-summation): same trust ratio as the CPU
    kernel (float64 norms, so equal to rounding), and bit-for-bit the same result on a second run."""
    shapes = [(5,), (CHUNK + 1,), (300 * CHUNK - 7,), (1000, CHUNK)]
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, dtype=dtype) for s in shapes]
    bufs = [torch.randn(s, dtype=dtype) for s in shapes]
    runs = []
    for _ in range(2):
        p, g, b = ([t.cuda() for t in ts] for ts in (params, grads, bufs))
        _lars_call(p, g, b, **mode)
        runs.append((p, b))
    _lars_call(params, grads, bufs, **mode)
    for i in range(len(shapes)):
        assert torch.equal(runs[0][0][i], runs[1][0][i]), "LARS is not deterministic"
        _ulps_close(runs[0][0][i].cpu(), params[i], 2, f"param {i}")
        _ulps_close(runs[0][1][i].cpu(), bufs[i], 2, f"buffer {i}")


def test_lars_optimizer_on_cuda_matches_cpu():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 6 * 6, 3))
    cpu = [p.detach().clone().requires_grad_() for p in model.parameters()]
    gpu = [p.detach().cuda().requires_grad_() for p in model.parameters()]
    opts = [fastcnn.optim.LARS(ps, lr=0.5, weight_decay=1e-4) for ps in (cpu, gpu)]
    for _ in range(5):
        for a, b in zip(cpu, gpu):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.cuda()
        for o in opts:
            o.step()
    for a, b in zip(cpu, gpu):
        _ulps_close(b.detach().cpu(), a.detach(), 4)


# --- the work table and CUDA graphs (issue 15.9) --------------------------------------------------------------------
def _sgd(params, grads, lr=0.5):
    ops.sgd_(params, grads, [], lr, None, 0.0, 0.0, 0.0, False, False, False, None, None)


def _adam(params, grads, m, v, steps):
    ops.adam_(params, grads, m, v, [], steps, 1e-2, None, 0.9, 0.999, 0.0, 1e-8, False, False, False, None, None)


def test_second_capture_of_a_capture_built_table_fills_it_itself():
    """The table is first built inside graph 1's capture; graph 2 hits the cache. Replaying ONLY graph 2 must read a
    filled table (before the fix only graph 1's copy node filled it: graph 2 read uninitialised memory)."""
    params = [torch.zeros(s, device="cuda") for s in ((CHUNK * 3 + 5,), (17,), (4, 4))]
    grads = [torch.full_like(p, float(i + 1)) for i, p in enumerate(params)]
    torch.cuda.synchronize()
    graphs = [torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()]
    for g in graphs:  # neither capture runs the kernels
        with torch.cuda.graph(g):
            _sgd(params, grads)
    for p in params:
        assert not p.any()
    for k in range(1, 4):
        graphs[1].replay()
        torch.cuda.synchronize()
        for i, p in enumerate(params):
            torch.testing.assert_close(p, torch.full_like(p, -0.5 * (i + 1) * k), rtol=0, atol=0)
    graphs[0].replay()
    torch.cuda.synchronize()
    for i, p in enumerate(params):
        torch.testing.assert_close(p, torch.full_like(p, -0.5 * (i + 1) * 4), rtol=0, atol=0)
    # An eager call with the same tensors builds its own table (the captured one is valid inside graphs only).
    _sgd(params, grads)
    torch.cuda.synchronize()
    for i, p in enumerate(params):
        torch.testing.assert_close(p, torch.full_like(p, -0.5 * (i + 1) * 5), rtol=0, atol=0)


def test_adam_steps_in_two_graphs_of_one_capture_built_table():
    """Adam's step counters live beside a capture-built table: each graph's fill zeroes them, so the step written
    after each replay is right whichever graph replays (claim_step needs counters at a multiple of the chunks)."""
    shapes = ((CHUNK * 2 + 1,), (9,))
    params = [torch.randn(s, device="cuda") for s in shapes]
    grads = [torch.randn_like(p) for p in params]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device="cuda") for _ in params]
    ref = [p.clone() for p in params]
    ref_m, ref_v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    ref_steps = [torch.zeros((), device="cuda") for _ in params]
    torch.cuda.synchronize()
    graphs = [torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()]
    for g in graphs:
        with torch.cuda.graph(g):
            _adam(params, grads, m, v, steps)
    for k in (1, 0, 1, 1, 0):
        graphs[k].replay()
        _adam(ref, grads, ref_m, ref_v, ref_steps)  # eager, another table
    torch.cuda.synchronize()
    for a, b in zip(steps, ref_steps):
        assert a.item() == b.item() == 5.0
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_warm_up_then_capture_reads_the_eager_table():
    params = [torch.zeros(100, device="cuda"), torch.zeros(CHUNK + 1, device="cuda")]
    grads = [torch.ones_like(p) for p in params]
    _sgd(params, grads)  # builds and uploads the table
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        _sgd(params, grads)
    g.replay()
    g.replay()
    torch.cuda.synchronize()
    for p in params:
        torch.testing.assert_close(p, torch.full_like(p, -1.5), rtol=0, atol=0)


def test_more_tables_than_the_cache_keeps_stay_correct():
    """100 distinct tables (the cache keeps 64, least recently used first out), revisited in two orders."""
    sets = [[torch.zeros(3 + k, device="cuda"), torch.zeros(CHUNK + k, device="cuda")] for k in range(100)]
    grads = [[torch.ones_like(p) for p in ps] for ps in sets]
    order = list(range(100)) + list(range(99, -1, -1)) + list(range(0, 100, 3))
    counts = [0] * 100
    for k in order:
        _sgd(sets[k], grads[k], lr=1.0)
        counts[k] += 1
    torch.cuda.synchronize()
    for k, ps in enumerate(sets):
        for p in ps:
            torch.testing.assert_close(p, torch.full_like(p, -float(counts[k])), rtol=0, atol=0)


def test_a_table_used_from_another_stream_then_evicted():
    """A table uploaded on the default stream and used at once on a side stream (which must wait for the upload),
    then evicted by 70 other tables while the side stream's step may still run."""
    params = [torch.zeros(CHUNK * 8, device="cuda")]
    grads = [torch.ones_like(params[0])]
    side = torch.cuda.Stream()
    _sgd(params, grads)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(20):
            _sgd(params, grads)
    others = [[torch.zeros(5 + k, device="cuda")] for k in range(70)]
    for ps in others:
        _sgd(ps, [torch.ones_like(ps[0])])
    torch.cuda.synchronize()
    torch.testing.assert_close(params[0], torch.full_like(params[0], -0.5 * 21), rtol=0, atol=0)


def _captured_adam_step(**kwargs):
    """One fastcnn.optim.Adam step captured into a CUDA graph (after an eager warm-up step that makes the state)."""
    params = [torch.nn.Parameter(torch.randn(5, 3, device="cuda"))]
    params[0].grad = torch.randn_like(params[0])
    optimizer = fastcnn.optim.Adam(params, **kwargs)
    optimizer.step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()
    return params[0], graph


def test_a_device_lr_tensor_is_read_by_the_captured_step_without_a_copy():
    lr = torch.tensor(1e-2, device="cuda")
    param, graph = _captured_adam_step(lr=lr)
    before = param.detach().clone()
    lr.fill_(0.0)  # the graph reads lr where it lies: a zero lr leaves the parameter unchanged
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(param.detach(), before, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=torch.tensor(1e-2)), "for a CUDA-graph capture give it as a float32 tensor on cuda"),
    (dict(lr=1e-2, betas=(torch.tensor(0.9), 0.999)), "betas is a tensor, which a CUDA-graph capture cannot read"),
])
def test_capture_refuses_what_it_cannot_record_with_a_clear_error(kwargs, message):
    with pytest.raises(RuntimeError, match=message):
        _captured_adam_step(**kwargs)
