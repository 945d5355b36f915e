"""Horovod at the edge: rank/size read once, optimizer wrapping, broadcasts. Model code never imports Horovod.

One process (plain ``python -m jobs.train``) runs with Horovod initialized at size 1, so there is one code path.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(threads: int = 1) -> Dist:
    """Initialize Horovod (Gloo on CPU, NCCL when built with it and a GPU is present); pin the device and threads."""
    # Horovod's background thread wakes every HOROVOD_CYCLE_TIME ms; at the default 1 ms it competes with the
    # compute threads on small machines (2 workers on 2 cores: ~32k samples/s at 1 ms, ~36k at 5 ms, bench/RESULTS.md)
    os.environ.setdefault("HOROVOD_CYCLE_TIME", "5")
    import horovod.torch as hvd
    hvd.init()
    if hvd.size() > 1:
        _wait_without_spinning()
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank())
        device = torch.device("cuda", hvd.local_rank())
    else:
        device = torch.device("cpu")
    return Dist(hvd.rank(), hvd.size(), hvd.local_rank(), device)


POLL_S = (50e-6, 500e-6)   # first and longest sleep between polls of a pending Horovod operation


def _wait_without_spinning() -> None:
    """Make Horovod's waits sleep between polls instead of spinning.

    ``hvd.synchronize`` (every gradient exchange the optimizers wait for, every collective here) calls the extension's
    ``horovod_torch_wait_and_clear``, which in 0.28 polls the handle in a loop of ``std::this_thread::yield()``: a
    rank that waits for the other keeps a core busy in ``sched_yield``, taking it from the threads that do the
    exchange (Horovod's background thread, Gloo's) and, when ranks share cores, from the other rank's training.
    Measured with ``bench/train_steps.py`` (2 ranks on 2 cores): 9.5 ms of kernel time per 44 ms step in the waiting
    thread. Here the wait sleeps between polls (``time.sleep``, which also releases the GIL for the batch-making
    thread), from ``POLL_S[0]`` doubling up to ``POLL_S[1]``: a short wait stays short, a long one costs a few
    thousand polls a second instead of a core. Then it releases the handle through the original call, which returns
    at once and raises the operation's error as before. ``ESMM_HOROVOD_WAIT=spin`` keeps Horovod's own wait (for
    comparison, ``bench/train.py``)."""
    if os.environ.get("ESMM_HOROVOD_WAIT") == "spin":
        return
    from horovod.torch import mpi_ops
    lib = mpi_ops.mpi_lib
    original = getattr(lib, "horovod_torch_wait_and_clear", None)
    if original is None or getattr(original, "_esmm_polite", False):
        return
    poll, (first, longest) = lib.horovod_torch_poll, POLL_S

    def wait_and_clear(handle):
        pause = first
        while not poll(handle):
            time.sleep(pause)
            pause = min(pause * 2, longest)
        return original(handle)
    wait_and_clear._esmm_polite = True
    lib.horovod_torch_wait_and_clear = wait_and_clear


def distributed_optimizer(opt: torch.optim.Optimizer, named: list, prefix: str) -> torch.optim.Optimizer:
    """Wrap ``opt`` so gradients are averaged across ranks; tensor names are prefixed to stay unique across
    optimizers (Horovod refuses two tensors with one name). Sparse gradients go through Horovod's allgather path."""
    import horovod.torch as hvd
    if hvd.size() == 1:
        return opt
    for _, p in named:
        # An EmbeddingBag's sparse gradient has one row per slot of the batch (B x L, mostly repeats: padding and
        # popular ids); Horovod allgathers it as is. Coalescing first (a tensor hook runs before the gradient is
        # accumulated, hence before Horovod's hook) sends ~10x fewer rows on the demo data.
        if p.requires_grad:
            p.register_hook(lambda g: g.coalesce() if g.is_sparse else g)
    return hvd.DistributedOptimizer(opt, named_parameters=[(f"{prefix}.{n}", p) for n, p in named])


def broadcast_parameters(model: torch.nn.Module) -> None:
    import horovod.torch as hvd
    if hvd.size() > 1:
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)


def broadcast_object(obj, name: str):
    """Rank 0's ``obj`` on every rank (rank 0's verdict on the run directory and the resume checkpoint: only rank 0
    reads those files, and every rank acts on the same verdict)."""
    import horovod.torch as hvd
    if hvd.size() == 1:
        return obj
    return hvd.broadcast_object(obj, root_rank=0, name=name)


def allreduce_sum(values: list[float], name: str) -> list[float]:
    import horovod.torch as hvd
    if hvd.size() == 1:
        return values
    return hvd.allreduce(torch.tensor(values, dtype=torch.float64), op=hvd.Sum, name=name).tolist()


def allgather_object(obj, name: str) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    import horovod.torch as hvd
    if hvd.size() == 1:
        return [obj]
    return hvd.allgather_object(obj, name=name)


def flag_ranks(flag: bool, name: str) -> list[int]:
    """The ranks whose ``flag`` is true, on every rank (a collective: every rank must call it)."""
    import horovod.torch as hvd
    if hvd.size() == 1:
        return [0] if flag else []
    return _ranks(hvd.allreduce(_one_hot(flag), op=hvd.Sum, name=name))


def flag_ranks_async(flag: bool, name: str):
    """Start :func:`flag_ranks` without waiting (Horovod negotiates it along with the gradients of the same step);
    :func:`flag_ranks_wait` returns its result."""
    import horovod.torch as hvd
    if hvd.size() == 1:
        return [0] if flag else []
    return hvd.allreduce_async(_one_hot(flag), op=hvd.Sum, name=name)


def flag_ranks_wait(handle) -> list[int]:
    if isinstance(handle, list):
        return handle
    import horovod.torch as hvd
    return _ranks(hvd.synchronize(handle))


def one_hot_flag(flag: bool) -> list[float]:
    """``flag`` at this rank's position of a world-size vector: allreduced (summed), it names the flagged ranks."""
    import horovod.torch as hvd
    v = [0.0] * hvd.size()
    v[hvd.rank()] = 1.0 if flag else 0.0
    return v


def ranks_of(summed: list[float]) -> list[int]:
    return [r for r, v in enumerate(summed) if v > 0]


def _one_hot(flag: bool) -> torch.Tensor:
    return torch.tensor(one_hot_flag(flag), dtype=torch.float32)  # float32: fuses with the dense gradients


def _ranks(t: torch.Tensor) -> list[int]:
    return ranks_of(t.tolist())


def under_horovodrun() -> bool:
    return "HOROVOD_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ
