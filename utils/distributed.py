"""The process layout of a run (rank, world size, main process): every module asks here, nothing else reads RANK.

Works the same under `torchrun` / `accelerate launch` (environment variables set, process group initialised
by `init_process_group` or by the Trainer) and in a plain single process (rank 0 of 1, nothing initialised,
every collective a no-op).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, TypeVar

from utils.errors import UserInputError

T = TypeVar("T")


def _dist():
    """torch.distributed when a process group is initialised, else None. Before anything imported it none can be,
    so the answer comes without importing torch (2-3 s), e.g. for the logging set up before the mode's imports."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes on this machine (torchrun sets LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size())))


def node_rank() -> int:
    """This machine's number among the machines of the job (torchrun's GROUP_RANK)."""
    return int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0")))


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    """True on the one process that writes the run folder's shared files (rank 0)."""
    return rank() == 0


def device_map(device: str) -> dict:
    """`from_pretrained(device_map=...)` for this process: its own GPU (cuda:LOCAL_RANK) or the CPU, never "auto"."""
    return {"": local_rank()} if device == "cuda" else {"": device}


def init_process_group() -> None:
    """Join the launcher's process group (gloo on CPUs, nccl on GPUs) if launched with several processes.

    Accelerate's PartialState does it the way the Trainer expects (and sets the CUDA device to LOCAL_RANK);
    the Trainer later finds it initialised. A plain single process initialises nothing.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and _dist() is None:
        from accelerate import PartialState

        PartialState()


def shutdown() -> None:
    """Leave the process group at exit (torch warns about a group that is never destroyed)."""
    dist = _dist()
    if dist is not None:
        dist.destroy_process_group()


def barrier() -> None:
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's obj on every rank (any picklable object); the others' argument is ignored."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's obj, in rank order, on every rank."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def split_for_rank(items: list[T], rank_: int | None = None, world: int | None = None) -> list[T]:
    """This rank's contiguous share of items: every item goes to exactly one rank, no padding.

    Shares differ in length by at most one, and concatenating them in rank order gives items back.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(len(items), world)
    start = rank_ * base + min(rank_, extra)
    return items[start:start + base + (rank_ < extra)]


def run_on_main(fn: Callable[[], T]) -> T:
    """fn() run on the main process only, its result returned on every rank.

    A UserInputError it raises is raised on every rank with the same message, so all ranks stop the same
    way instead of the others waiting for a process that has already exited.
    """
    if not is_distributed():
        return fn()
    outcome = None
    if is_main_process():
        try:
            outcome = ("ok", fn())
        except UserInputError as error:
            outcome = ("error", str(error))
    kind, value = broadcast_object(outcome)
    if kind == "error":
        raise UserInputError(value)
    return value


def on_main_process(fn: Callable[..., T], *args, **kwargs) -> T | None:
    """fn(*args, **kwargs) on the main process (for writes that must happen once); None elsewhere."""
    return fn(*args, **kwargs) if is_main_process() else None


@contextmanager
def local_main_first():
    """The first process of each machine runs the block first (e.g. creates a file there), the others after it."""
    if local_rank() != 0:
        barrier()
    yield
    if local_rank() == 0:
        barrier()
