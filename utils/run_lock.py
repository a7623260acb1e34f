"""One job per run folder at a time: an flock on FOLDER/.lock, held by the job's main process until it exits.

The lock file says who holds it (PID, host, command, start time), so a second job can name the first. The
lock is the kernel's flock, not the file: it dies with the process that held it, so a job killed with
SIGKILL never blocks the next one, while the file with its last holder stays behind harmlessly.

Ranks of one torchrun job share the lock: the main process takes it and every rank gets the same error
(utils.distributed.run_on_main). Within one process taking the same folder again is a no-op (--demo runs
several modes in a row), and `release_all` lets go at the end of a command (tests run many in one process).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from utils import distributed
from utils.errors import UserInputError

LOCK_NAME = ".lock"

_held: dict[Path, int] = {}  # resolved lock file -> open descriptor holding its flock


def _holder_text() -> str:
    return json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    })


def _describe_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return f"PID {holder['pid']} on host {holder['host']} (started {holder['started']}: {holder['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its lock file names no holder yet)"


def _acquire(path: Path, what: str, shown: Path) -> None:
    path = path.resolve()
    if path in _held:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UserInputError(
            f"{what} {shown} is in use by another job: {_describe_holder(path)}. Two jobs writing one folder "
            "would mix or destroy each other's files. Wait for that job to finish (or stop it), or give this "
            "one another folder. A job that was killed holds nothing: its lock ends with its process."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (_holder_text() + "\n").encode("utf-8"), 0)
    _held[path] = fd


def lock_folder(folder: Path, what: str) -> None:
    """Hold FOLDER/.lock until this process exits (or release_all); UserInputError naming the holder if taken.

    `what` names the folder in the message (e.g. "The run folder", "--output_dir"). Call it on every rank.
    """
    distributed.run_on_main(lambda: _acquire(Path(folder) / LOCK_NAME, what, Path(folder)))


def lock_output_file(target: Path, what: str) -> None:
    """lock_folder for one output file written outside a run folder: the lock is `.NAME.lock` beside it."""
    target = Path(target)

    def take() -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        _acquire(target.with_name(f".{target.name}.lock"), what, target)

    distributed.run_on_main(take)


def release_all() -> None:
    """Let go of every lock this process holds (the end of one command)."""
    while _held:
        _, fd = _held.popitem()
        os.close(fd)  # closing the last descriptor releases the flock
