"""File locks between grouplora processes that share one GROUPLORA_HOME.

First-time initialization races: two or three `grouplora run` started together on a new home each create
Dagster's sqlite run/event/schedule storage and MLflow's sqlite store, and both run their schema migrations at
once (alembic "two heads", "database is locked", "table _alembic_tmp_metrics already exists"), which leaves the
home broken for every later run. `home_lock` serializes that step: the first process initializes, the others
wait (saying so, once) and then find the stores ready.

`fcntl.flock` locks belong to the open file: the kernel drops them when the holder exits, however it exits
(kill -9 included), so a crash never leaves a stale lock behind. The file keeps the holder's pid and host for
the waiting message; its content is informational only. POSIX only (Linux, macOS).
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class LockTimeout(TimeoutError):
    """Another process held the lock for longer than the caller was willing to wait."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return text


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def home_lock(path: str | os.PathLike, timeout: float = 600.0, message: str | None = None, *,
              poll: float = 0.2, notify: Callable[[str], None] = _say) -> Iterator[Path]:
    """Hold an exclusive lock on `path` (created with its folder) for the `with` block.

    When another process holds it, `notify` gets one line (`message`, where "{holder}" becomes the holder's pid and
    host; else a default naming the lock file and its holder), then
    this waits, polling every `poll` seconds, for up to `timeout` seconds (0: don't wait) and raises LockTimeout
    naming the lock file and its holder. Reentrant use from one process on the same path would deadlock: don't."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(0.0, timeout)
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(fd)
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"{path}: still locked after {timeout:g}s"
                                      + (f" by {holder}" if holder else "")
                                      + "; if no grouplora process is running, the lock is free: retry") from None
                if not told:
                    notify(message.replace("{holder}", holder or "another process") if message else
                           f"waiting for {path}" + (f" (held by {holder})" if holder else "") + " ...")
                    told = True
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
