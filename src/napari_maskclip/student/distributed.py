"""Data-parallel student training under ``torchrun``: the process group and what ranks share.

``torchrun --nproc_per_node N -m napari_maskclip.cli train ...`` starts N copies of the training
with ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set.
:func:`start` joins them into one process group (gloo on the CPU, nccl on CUDA GPUs, with a
timeout so that a rank that stops answering ends the run instead of hanging it); the training
(:mod:`.training`) then asks :func:`current` which rank it is:

* every rank draws the same global batch (the crops a single process would draw for that
  iteration) and computes only its share, :meth:`Ranks.share` (rank r of W takes the r-th of W
  equal slices), teacher labels included;
* gradients are averaged by DDP; the loss is the sum over the rank's pixels divided by the
  global number of counted pixels (times W, which DDP's averaging divides out), so the update is
  that of the single-process run on the same global batch;
* rank 0 alone locks and checks the checkpoint's place, validates and saves; the others wait at
  barriers.

Nothing here depends on the number of ranks that wrote a checkpoint: its weights and optimiser
state are those of the global batch, so a run may resume under any number of ranks.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from ..errors import InvalidInputError

__all__ = ["Ranks", "current", "launched", "start", "stop", "TIMEOUT_ENV", "DEFAULT_TIMEOUT_S"]

#: Seconds a rank waits for the others at a collective (validation on rank 0 included) before the
#: run fails; the environment variable overrides it.
TIMEOUT_ENV = "NAPARI_MASKCLIP_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """Which of how many data-parallel processes this one is (1 of 1 when not distributed)."""

    world_size: int = 1
    rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that locks, validates, saves and reports."""
        return self.rank == 0

    def share(self, batch_size: int) -> slice:
        """This rank's positions in a global batch of ``batch_size`` (divisible by the ranks)."""
        per = batch_size // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of ``value`` over all ranks (a new tensor; ``value`` itself is unchanged)."""
        total = value.detach().clone()
        if self.active:
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        return total

    def any(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """True on every rank when ``flag`` is true on at least one."""
        if not self.active:
            return flag
        return bool(self.sum(torch.tensor([int(flag)], device=device)).item() > 0)


def current() -> Ranks:
    """The ranks of the process group this process is in (1 of 1 when there is none)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_world_size(), dist.get_rank())
    return Ranks()


def launched() -> bool:
    """Whether this process was started by torchrun (or a launcher like it) with others."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return True  # let start() say what is wrong


def _timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InvalidInputError(
            f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}."
        )
    return value


def start(device: torch.device) -> Ranks:
    """Join the process group torchrun describes in the environment; 1 of 1 when not launched.

    The backend follows the training device: nccl for CUDA (each rank on GPU ``LOCAL_RANK``),
    gloo otherwise. Returns :func:`current`."""
    if not launched():
        return Ranks()
    dist = torch.distributed
    if dist.is_initialized():
        return current()
    missing = [name for name in _ENV if not os.environ.get(name)]
    try:
        world, rank, local = (int(os.environ.get(n, ""))
                              for n in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    except ValueError:
        missing = missing or ["WORLD_SIZE/RANK/LOCAL_RANK as whole numbers"]
    if missing or not dist.is_available():
        raise InvalidInputError(
            f"WORLD_SIZE is set, but not {', '.join(missing) or 'torch.distributed'}; start "
            "data-parallel training with "
            "torchrun --nproc_per_node N -m napari_maskclip.cli train ..."
        )
    if not 0 <= rank < world:
        raise InvalidInputError(f"RANK {rank} is not in 0..{world - 1}; start with torchrun.")
    backend = "gloo"
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise InvalidInputError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s): start at most "
                "one process per GPU (--nproc_per_node), or train on --device cpu."
            )
        torch.cuda.set_device(local)
        backend = "nccl"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=_timeout_s()))
    return current()


def stop() -> None:
    """Leave the process group (if this process is in one)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
