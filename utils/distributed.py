"""The process layout of a run (rank, world size, main process): every module asks here, nothing else reads RANK.

Works the same under `torchrun` / `accelerate launch` (environment variables set, process group maybe
initialised by the Trainer or Accelerate) and in a plain single process (rank 0 of 1).
"""

from __future__ import annotations

import os
from contextlib import contextmanager


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


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


def shard_for_local_rank(items: list) -> list:
    """This process's share of items among the processes of its machine: every item goes to exactly one."""
    return items[local_rank() :: local_world_size()]


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    """True on the one process that writes the run folder's shared files (rank 0)."""
    return rank() == 0


def barrier() -> None:
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


@contextmanager
def main_process_first():
    """Rank 0 runs the block first (e.g. creates a folder), the others wait, then run it."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()
