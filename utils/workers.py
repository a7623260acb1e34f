"""DataLoader worker processes that end with the job: a worker whose parent dies, however it dies, exits too.

A DataLoader's workers watch their parent only between batches and can outlive a `kill -9` of the main
process for minutes (seen: over 7, holding 0.5 GB each). On Linux each worker asks the kernel for SIGKILL
when its parent dies (prctl PR_SET_PDEATHSIG), and checks right after that the parent is still the one
that started it, in case it died before the request. Every DataLoader of the project goes through here.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

import torch

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when its parent exits (Linux; elsewhere nothing to do)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl in this libc: the worker's own parent check still applies
        return
    if os.getppid() != parent_pid:  # the parent died before the request was made
        os._exit(1)


class WorkerInit:
    """A DataLoader worker_init_fn: die_with_parent, then the loader's own init function if it had one.

    The kernel sends the signal when the parent *thread* ends; DataLoader iterators start their workers
    from the thread that iterates, the main thread here.
    """

    def __init__(self, inner=None):
        self.inner, self.parent_pid = inner, os.getpid()

    def __call__(self, worker_id: int) -> None:
        die_with_parent(self.parent_pid)
        if self.inner is not None:
            self.inner(worker_id)


def guard_workers(loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
    """The loader, its workers (if any) set to end with this process; e.g. for the Trainer's own loaders."""
    # Accelerate's prepared loaders wrap the real DataLoader, which is the one that starts the workers.
    inner = getattr(loader, "base_dataloader", loader)
    if not isinstance(inner.worker_init_fn, WorkerInit):
        inner.worker_init_fn = WorkerInit(inner.worker_init_fn)
    return loader


def data_loader(dataset, **kwargs) -> torch.utils.data.DataLoader:
    """torch.utils.data.DataLoader(dataset, **kwargs) whose workers end with this process."""
    return guard_workers(torch.utils.data.DataLoader(dataset, **kwargs))
