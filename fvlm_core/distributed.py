"""Process-group helpers: who am I, start/stop torchrun's process group, gathering of per-rank
tensors into the global batch (embeddings WITH gradients, integer ids without), and the small
collectives a training loop needs (sums, minimum, "does any rank say stop").

The gathers take ``rank`` and ``world_size`` from their caller, as open_clip's
``gather_features`` does: a loss is told at construction whether it runs distributed
(``fvlm_core.loss.FineGrainedContrastiveLoss(rank=..., world_size=...)``) and does not look at
global state on every call. They use the default process group.

Gradient semantics of :func:`gather_with_grad` (as in open_clip's ``gather_features`` with
``gather_with_grad=True``, which uses ``torch.distributed.nn.functional.all_gather``; torch 2.9+
deprecates that function, so :class:`_AllGatherWithGrad` implements the same autograd rule): the
forward concatenates every rank's tensor; the backward sums, over ranks, the gradient each
rank's loss sends to a chunk and hands the sum to the chunk's owner. When every rank computes the *same*
global loss ``L`` from the gathered batch, rank r therefore receives ``W * dL/dx_r`` for its own
rows; DistributedDataParallel then averages parameter gradients over the ``W`` ranks, which
gives exactly ``dL/dθ`` of a single process holding the whole global batch. Parameters used
outside the gathered tensors (the temperature) get ``dL/dθ`` on every rank, and the DDP average
of identical values leaves it unchanged. ``Testing/test_loss_distributed.py`` checks both.

Ranks may hold different batch sizes (the last batch of an epoch): tensors are padded to the
largest size for the collective and the padding is cut off again, so row order is
``[rank 0 rows, rank 1 rows, ...]`` everywhere.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def dist_info() -> DistInfo:
    """Rank and world size of the initialised process group (or of the torchrun environment)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def launched_by_torchrun() -> bool:
    """True when the torchrun environment variables (RANK, WORLD_SIZE) say world size > 1."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(backend: str | None = None, timeout_minutes: float = 30.0) -> DistInfo:
    """Initialise the default process group from torchrun's environment (``env://``).

    ``backend`` defaults to ``nccl`` when CUDA is available and ``gloo`` otherwise. Returns
    the single-process :class:`DistInfo` without touching torch.distributed when the
    environment does not describe a world of several processes.
    """
    if not launched_by_torchrun():
        return DistInfo()
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist_info()


def cleanup_distributed() -> None:
    """Destroy the default process group if this process created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _sizes(t: torch.Tensor, world_size: int) -> list[int]:
    """First-dimension size of ``t`` on every rank."""
    size = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[0] == n:
        return t
    pad = t.new_zeros((n - t.shape[0], *t.shape[1:]))
    return torch.cat([t, pad], dim=0)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for a chunk onto its owner.

    Forward: ``t`` (same shape on every rank) -> ``(W, *t.shape)``. Backward: all-reduce (sum)
    of the ``(W, ...)`` gradient, then this rank's slice (what a reduce-scatter gives; all-reduce
    works on every backend, and embeddings are small).
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        ctx.rank = rank
        chunks = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(chunks, t.contiguous())
        return torch.stack(chunks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank], None, None


def gather_with_grad(t: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Concatenate ``t`` (N_r, ...) of every rank along dim 0, keeping the autograd graph.

    ``world_size`` 1 returns ``t`` unchanged. The gradient semantics are in the module docstring.
    """
    if world_size == 1:
        return t
    sizes = _sizes(t, world_size)
    padded = _pad_rows(t, max(sizes))
    chunks = _AllGatherWithGrad.apply(padded, rank, world_size)
    return torch.cat([c[:n] for c, n in zip(chunks, sizes)], dim=0)


@torch.no_grad()
def gather_no_grad(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate ``t`` (N_r, ...) of every rank along dim 0, without gradients.

    For integer ids and boolean masks (bool is sent as uint8, which every backend supports).
    ``world_size`` 1 returns ``t`` unchanged.
    """
    if world_size == 1:
        return t
    is_bool = t.dtype == torch.bool
    src = t.to(torch.uint8) if is_bool else t
    sizes = _sizes(src, world_size)
    padded = _pad_rows(src.contiguous(), max(sizes))
    chunks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded)
    out = torch.cat([c[:n] for c, n in zip(chunks, sizes)], dim=0)
    return out.bool() if is_bool else out


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of ``value`` over ranks (a detached copy; the value itself in a single process)."""
    value = value.detach().clone()
    if is_distributed():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def min_over_ranks(value: int) -> int:
    """The smallest of every rank's ``value``."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (e.g. "stop now")."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj: object) -> list[object]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()
