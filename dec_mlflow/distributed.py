"""Data-parallel training across processes: the few collectives DEC needs, and the torchrun launch.

Every function here is a no-op (it returns its input unchanged) when no process group is
initialised, so the training loops read the same for 1 or N processes and one process computes
exactly what it computed before distribution existed. With N processes (started by torchrun, which
sets ``RANK``, ``WORLD_SIZE`` and the rendezvous in the environment):

- each mini-batch of ``batch_size`` rows (the same on every rank: rank 0's permutation is
  broadcast every epoch) is split across the ranks, and the gradients are summed with one
  all-reduce, each rank's loss weighted by its share of the batch, so a step is the step one
  process would take on the whole batch;
- the full passes over the data (target P, embedding) are split into contiguous blocks of rows;
  the cluster frequencies f_j, the count of changed labels and the KL are summed over ranks, and
  the n x k blocks of P (or the n x d embedding) are gathered where every row is needed;
- rank 0 alone computes the initial clustering and broadcasts it; rank 0 alone logs.

The process group uses gloo on the CPU and NCCL when training runs on CUDA.
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist

from dec_mlflow.environment import Stopped

# The initial clustering runs on rank 0 alone (UMAP on a large embedding takes minutes) while the
# other ranks wait in a broadcast; a crashed peer is noticed at once (its connection closes).
TIMEOUT = datetime.timedelta(hours=2)


class WorkerFailed(RuntimeError):
    """A training process started by torchrun failed; its own error is printed above this one."""


def in_torchrun() -> bool:
    """True in a process that torchrun (or another launcher of the same contract) started as one rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_world_size() -> int:
    """Ranks on this machine: torchrun's ``--nproc-per-node`` (1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if in_torchrun() else 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the rank that logs and writes files (and in a single process)."""
    return rank() == 0


@contextmanager
def process_group(device: str = "auto") -> Iterator[None]:
    """Join the process group torchrun set up (gloo on the CPU, NCCL for CUDA); nothing outside torchrun.

    ``device`` is the estimator's: NCCL needs each rank on its own GPU, ``cuda:LOCAL_RANK``, which
    becomes the current device so that ``'cuda'`` and ``'auto'`` pick it. A SIGTERM (torchrun stops
    the other ranks when one fails) raises ``SystemExit`` so that open runs end FAILED.
    """
    if not in_torchrun() or dist.is_initialized():
        yield
        return
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    # with CUDA, NCCL for the tensors on the GPU and gloo for those on the CPU (the epoch's permutation)
    dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def launch(nproc: int, module: str, args: Sequence[str]) -> None:
    """Run ``python -m module *args`` as ``nproc`` ranks on this machine with torchrun, and wait.

    This is ``torchrun --standalone --nproc-per-node nproc -m module args`` (PyTorch's own elastic
    launcher, in this process): it picks a free rendezvous port, sets each rank's environment,
    streams their output, and stops every rank as soon as one fails.

    Raises
    ------
    WorkerFailed
        When a rank fails, naming the first that did and how.
    Stopped
        When this process is told to stop (Ctrl-C, SIGTERM): torchrun has then stopped the ranks.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    config = parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", module])
    config.training_script_args = list(args)  # not parsed: torchrun would take --nproc for its --nproc-per-node
    try:
        run(config)
    except ChildFailedError as e:
        failed, failure = e.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        raise WorkerFailed(f"training process rank {failed} of {nproc} failed ({how}); its error, if any, "
                           "is printed above; the other ranks were stopped") from None
    except SignalException as e:  # this process was told to stop (Ctrl-C, SIGTERM): torchrun stopped the ranks
        raise Stopped(e.sigval) from None


# ---------------------------------------------------------------------------- collectives
def broadcast(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank (in place); the same tensor with one process."""
    if world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def broadcast_parameters(params: Iterable[torch.Tensor]) -> None:
    """Copy rank 0's values of ``params`` into every rank's, so that all ranks start identical."""
    if world_size() > 1:
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)


def broadcast_object(obj):
    """Rank 0's ``obj`` (any picklable value; what other ranks pass is ignored) on every rank."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks (in place); the same tensor with one process."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def global_mean(local_mean: torch.Tensor, n_local: int, n_total: int) -> torch.Tensor:
    """The mean over all rows from each rank's mean over its ``n_local`` rows; unchanged with one process."""
    if world_size() == 1:
        return local_mean
    return all_reduce_sum(local_mean.detach().double() * n_local) / n_total


def all_reduce_gradients(params: Sequence[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over ranks with one all-reduce of one flat buffer.

    A parameter without a gradient (a rank with no row in this batch) contributes zeros. Each rank
    weights its loss by its share of the batch (:func:`shard_batch`), so the sum is the gradient
    of the mean loss over the whole batch.
    """
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (n_params,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g)
        offset += g.numel()


def rows(n: int) -> slice:
    """This rank's contiguous block of the rows ``0..n-1`` in the full passes (all of them with one process)."""
    size, r = world_size(), rank()
    return slice(r * n // size, (r + 1) * n // size)


def all_gather_rows(block: torch.Tensor) -> torch.Tensor:
    """The blocks of :func:`rows` of every rank, concatenated in rank order: (n, ...) from (n_rank, ...)."""
    size = world_size()
    if size == 1:
        return block
    sizes = torch.tensor([block.shape[0]], device=block.device)
    gathered_sizes = [torch.zeros_like(sizes) for _ in range(size)]
    dist.all_gather(gathered_sizes, sizes)
    longest = int(max(s.item() for s in gathered_sizes))
    padded = torch.zeros((longest, *block.shape[1:]), dtype=block.dtype, device=block.device)
    padded[: block.shape[0]] = block
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())  # all_gather needs equal shapes: blocks are padded
    return torch.cat([part[: int(s.item())] for part, s in zip(parts, gathered_sizes)])


def shard_batch(idx: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This rank's rows of the mini-batch ``idx`` and its share of the batch (every row, 1.0, with one process).

    Rank r takes every N-th row from the r-th, so the ranks split each batch evenly.
    """
    size = world_size()
    if size == 1:
        return idx, 1.0
    mine = idx[rank() :: size]
    return mine, mine.numel() / idx.numel()
