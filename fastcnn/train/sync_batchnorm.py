"""A BatchNorm2d whose batch statistics are reduced over the process group, on CPU (gloo) as on GPU (NCCL).

torch's nn.SyncBatchNorm refuses CPU tensors; this one all-reduces, per channel, the float64 sums Σx, Σx² and the
count, so every process normalises with the statistics of the combined batch:

    mean = Σx / N,   var = Σx² / N − mean²   (biased, used to normalise; running_var gets var · N/(N − 1)).

Backward (x̂ = (x − mean)·invstd, dy the incoming gradient) all-reduces Σdy and Σdy·x̂ and returns

    dx = weight · invstd · (dy − Σdy / N − x̂ · Σdy·x̂ / N),   dweight = Σ_local dy·x̂,   dbias = Σ_local dy,

which, with the parameter gradients summed over processes, are the gradients of the *sum* of the processes' losses
(as torch's SyncBatchNorm); DistributedDataParallel's averaging of every parameter gradient then divides all of them
by the world size alike, giving the gradient of the mean loss.
"""
import torch
import torch.distributed as dist
import torch.nn as nn


def _all_reduce(tensor, group):
    if dist.get_backend(group) == "nccl" and tensor.device.type != "cuda":
        raise ValueError("SyncBatchNorm2d: the NCCL process group needs CUDA tensors")
    dist.all_reduce(tensor, group=group)
    return tensor


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, group):
        channels = input.shape[1]
        x = input.double().transpose(0, 1).reshape(channels, -1)
        stats = torch.cat([x.sum(1), (x * x).sum(1), torch.full((1,), float(x.shape[1]), dtype=torch.float64,
                                                                 device=x.device)])
        stats = _all_reduce(stats, group)
        count = stats[-1]
        mean = stats[:channels] / count
        var = (stats[channels:2 * channels] / count - mean * mean).clamp_min(0)
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            unbiased = var * count / (count - 1).clamp_min(1)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        invstd = torch.rsqrt(var + eps)
        shape = (1, channels) + (1,) * (input.dim() - 2)
        normalized = (input.double() - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(normalized, weight, invstd, count)
        ctx.group = group
        output = normalized
        if weight is not None:
            output = output * weight.double().view(shape) + bias.double().view(shape)
        return output.to(input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        normalized, weight, invstd, count = ctx.saved_tensors
        channels = normalized.shape[1]
        shape = (1, channels) + (1,) * (normalized.dim() - 2)
        dims = [0] + list(range(2, normalized.dim()))
        dy = grad_output.double()
        local = torch.cat([dy.sum(dims), (dy * normalized).sum(dims)])
        total = _all_reduce(local.clone(), ctx.group)
        sum_dy, sum_dy_xhat = total[:channels].view(shape), total[channels:].view(shape)
        scale = invstd.view(shape) * (weight.double().view(shape) if weight is not None else 1.0)
        grad_input = scale * (dy - sum_dy / count - normalized * sum_dy_xhat / count)
        grad_weight = grad_bias = None
        if weight is not None:
            grad_weight, grad_bias = local[channels:].to(weight.dtype), local[:channels].to(weight.dtype)
        return grad_input.to(grad_output.dtype), grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same arguments, parameters, buffers and state_dict keys) whose training-mode statistics
    are those of the batch combined over ``process_group``; in eval mode, or without an initialised process group,
    it is plain BatchNorm2d.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as ``nn.BatchNorm2d``.
        process_group: the group to reduce over (default: the whole world).

    Shape:
        input ``(N, C, H, W)``; output the same.

    Example:
        >>> model = convert_sync_batchnorm(model)          # before wrapping in DistributedDataParallel
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def forward(self, input):
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        if self.momentum is None:
            raise ValueError("SyncBatchNorm2d: momentum=None (cumulative average) is not supported")
        if input.dim() != 4:
            raise ValueError(f"SyncBatchNorm2d: expected a 4-D input (N, C, H, W), got {input.dim()}-D")
        tracking = self.track_running_stats
        if tracking:
            self.num_batches_tracked.add_(1)
        group = self.process_group or dist.group.WORLD
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, self.running_mean if tracking else None,
                                            self.running_var if tracking else None, self.momentum, self.eps, group)


def convert_sync_batchnorm(module, process_group=None):
    """Replace every ``nn.BatchNorm2d`` in ``module`` (in place) by a :class:`SyncBatchNorm2d` holding the same
    parameters and buffers; returns the module (or the replacement, when ``module`` itself is a BatchNorm2d)."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        tensor = next(module.parameters(), next(module.buffers(), None))
        replacement = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats, process_group,
                                      device=tensor.device if tensor is not None else None)
        replacement.load_state_dict(module.state_dict())
        replacement.train(module.training)
        return replacement
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, process_group))
    return module
