"""One loop at a time per project: an OS file lock on `<artifacts>/.r2m.lock`.

`r2m run` and the Prefect flows (`flows/continual.py`) hold it from before the scan to the end
of the release, so two starts a second apart (the schedule, a user, a CI job) never both
onboard the same dataset: the second waits for the first (or, with `wait=False`, refuses with
one line naming the holder) and then finds the work done. The lock is `flock(2)` on an open
file: the kernel releases it when its holder exits, however it exits (kill -9 included), so
there is no stale lock to clean up. It serialises runs on one host (and on NFS where flock is
supported); runs on several machines sharing a tracking server need a server-side lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from r2m.config import Params
from r2m.errors import R2MError

LOCK_FILE = ".r2m.lock"


class LoopBusy(R2MError):
    """Another loop run holds the project lock."""


def lock_path(params: Params) -> Path:
    return params.path("artifacts") / LOCK_FILE


def _holder(path: Path) -> str:
    """Who holds the lock, as its holder wrote it (best effort: it is written after locking)."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "holder unknown"
    if not isinstance(info, dict) or "pid" not in info:
        return "holder unknown"
    return f"pid {info['pid']} on {info.get('host', '?')} since {info.get('since', '?')}"


@contextmanager
def project_lock(params: Params, *, wait: bool = True, timeout_s: float | None = None,
                 on_wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the project's loop lock for the `with` block.

    Free: taken at once. Held by another process: with `wait` block until it is released
    (at most `timeout_s` seconds when given), telling `on_wait` once; without `wait` raise
    `LoopBusy`. Not re-entrant: a second `project_lock` in the same process waits for the first.
    """
    path = lock_path(params)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            if not wait:
                raise LoopBusy(f"{path}: another r2m loop run holds this project's lock ({holder}); "
                               "run again when it has finished") from None
            if on_wait is not None:
                on_wait(f"waiting for the r2m loop run holding {path} ({holder})")
            if timeout_s is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                deadline = time.monotonic() + timeout_s
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise LoopBusy(f"{path}: still held after {timeout_s:g} s ({_holder(path)})") from None
                        time.sleep(0.2)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
