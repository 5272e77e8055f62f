"""One training process or many: the same loop under ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node=N -m pipeline train …`` starts N copies of the same
command; each reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from its environment. Without those
variables (or with ``WORLD_SIZE=1``) nothing here does anything and training is the plain
single-process loop.

With N > 1 the loop (``pipeline.train.loop``):

* joins the process group (NCCL on CUDA, gloo on CPU) and, on CUDA, uses GPU ``LOCAL_RANK``;
* wraps the model in ``DistributedDataParallel``: gradients are averaged across ranks during
  ``backward``, so every rank holds the same gradients, the same gradient norm and, after
  the step, the same weights;
* keeps the global batch: every rank draws the same permutation (same seed) and takes its
  strided share (``rank::world``) of each ``batch_size`` rows, so the N processes take the
  steps one process would, each on ``batch_size / N`` rows;
* takes every stopping decision on rank 0 and broadcasts it, so all ranks stop (or reduce the
  learning rate, or fail as diverged) at the same step;
* leaves every side effect to rank 0: training-state checkpoints, gradient telemetry, the
  MLflow run, the published checkpoint. Other ranks only read the training state to resume.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def ranks() -> Ranks:
    """This process's place in the job, from torchrun's environment; joins the process group
    the first time (once per process; left at exit)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        atexit.register(_leave)
        log.info(
            "joined process group: rank %d of %d (%s)",
            dist.get_rank(),
            dist.get_world_size(),
            backend,
        )
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def place(device: torch.device, r: Ranks) -> torch.device:
    """One GPU per rank: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    if r.active and device.type == "cuda":
        device = torch.device("cuda", r.local_rank)
        torch.cuda.set_device(device)
    return device


def wrap(model: torch.nn.Module, device: torch.device, r: Ranks) -> torch.nn.Module:
    """The module to call for the forward pass: DDP around ``model`` when distributed.
    ``model`` itself stays the one to read weights from and to save."""
    if not r.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def shard(idx: torch.Tensor, r: Ranks) -> torch.Tensor:
    """This rank's strided share of one global batch of row indices."""
    return idx[r.rank :: r.world] if r.active else idx


def steps_per_epoch(n: int, batch_size: int, r: Ranks) -> int:
    """Global batches per epoch; a last batch too small to give every rank a row is dropped."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest and rest >= r.world else 0)


def from_main(obj: Any, r: Ranks) -> Any:
    """Rank 0's ``obj`` on every rank (a stopping decision: all ranks act on the same one)."""
    if not r.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
