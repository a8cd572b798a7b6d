"""BatchNorm arrangements that keep a contrastive loss from reading the batch statistics.

MoCo's shuffling BN (He et al. 2020, sec. 3.3): when a query and its positive key are normalised
by statistics of the same images, the model can match them through the batch statistics instead
of the content (the "leak"). The paper's 8 GPUs each normalise their own 32 images and the keys
are shuffled across GPUs first; ``SplitBatchNorm`` does the same inside one process (MoCo's CIFAR
demo), and the same code then runs per rank under DDP.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm


def check_bn_splits(splits: int, batch_size: int) -> None:
    """A batch of ``batch_size`` images must split into ``splits`` equal slices of at least 2
    (a 1-image slice has no variance). One slice (no split) is always fine."""
    if splits > 1 and (batch_size % splits or batch_size // splits < 2):
        raise ValueError(f"method.bn_splits ({splits}) must split each worker's batch of "
                         f"{batch_size} images into equal slices of at least 2; choose a divisor "
                         f"of {batch_size} up to {batch_size // 2}, or change optim.batch_size")


class SplitBatchNorm(_BatchNorm):
    """BatchNorm that, in training, normalises ``splits`` equal contiguous slices of the batch by
    their own statistics, and updates the running statistics once per call with the mean of the
    slices' updates (MoCo's CIFAR demo, ``SplitBatchNorm``). In eval mode it is plain BatchNorm.
    Inputs ``[N, C]`` or ``[N, C, H, W]``; same parameters and buffers as ``nn.BatchNorm2d``.
    """

    def __init__(self, num_features: int, splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.splits = splits

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"SplitBatchNorm expects [N, C] or [N, C, H, W], got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.splits > 1 and self.track_running_stats):
            return super().forward(x)
        self._check_input_dim(x)
        check_bn_splits(self.splits, len(x))
        self.num_batches_tracked += 1
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        outs, means, variances = [], [], []
        for part in x.chunk(self.splits):
            mean, var = self.running_mean.clone(), self.running_var.clone()  # updated in place
            outs.append(F.batch_norm(part, mean, var, self.weight, self.bias, True, factor,
                                     self.eps))
            means.append(mean)
            variances.append(var)
        with torch.no_grad():  # one update, the mean of the slices' (MoCo's CIFAR demo)
            self.running_mean.copy_(torch.stack(means).mean(0))
            self.running_var.copy_(torch.stack(variances).mean(0))
        return torch.cat(outs)


def split_batchnorm(module: nn.Module, splits: int) -> nn.Module:
    """Replace every BatchNorm1d/2d inside ``module`` by a ``SplitBatchNorm`` of ``splits``
    slices with the same parameters and statistics (state-dict keys unchanged); in place."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            split = SplitBatchNorm(child.num_features, splits, eps=child.eps,
                                   momentum=child.momentum, affine=child.affine,
                                   track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split.to(next(child.buffers(), torch.empty(0)).device))
        else:
            split_batchnorm(child, splits)
    return module


def shuffled_forward(encoder: nn.Module, x: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``encoder(x)`` on a random permutation of the batch (drawn from ``generator``), outputs
    returned in input order: with ``SplitBatchNorm`` inside, each image is normalised with other
    images than in an unshuffled pass (the keys' side of shuffling BN)."""
    if generator is None:
        return encoder(x)
    order = torch.randperm(len(x), generator=generator).to(x.device)
    shuffled = encoder(x[order])
    out = torch.empty_like(shuffled)
    out[order] = shuffled
    return out


@torch.no_grad()
def broadcast_batchnorm_stats(module: nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s BatchNorm running statistics (a no-op outside a process group).

    Workers train with their own statistics (DDP's ``broadcast_buffers=False``, which per-rank
    buffers such as memory-bank shards need); before an E-step every rank must encode its shard
    with the same ones, as the reference PCL does (DDP broadcasts rank 0's buffers there)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for norm in module.modules():
        if isinstance(norm, _BatchNorm) and norm.track_running_stats:
            for buffer in (norm.running_mean, norm.running_var, norm.num_batches_tracked):
                dist.broadcast(buffer, src)
