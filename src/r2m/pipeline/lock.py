"""One loop at a time per project and per shared tracking server.

`r2m run` and the Prefect flows (`flows/continual.py`) hold `project_lock` from before the scan
to the end of the release, so two starts a second apart (the schedule, a user, a CI job) never
both onboard the same dataset: the second waits for the first (or, with `wait=False`, refuses
with one line naming the holder) and then finds the work done.

Two locks, taken in this order:

- the project's file lock, `flock(2)` on `<artifacts>/.r2m.lock`: the kernel releases it when
  its holder exits, however it exits (kill -9 included), so there is no stale lock to clean up.
  It serialises runs on one host (and on NFS where flock is supported);
- with a tracking *server* (`MLFLOW_TRACKING_URI=http(s)://...`), the registry lock
  (`registry_lock`): loops on several machines share the registry, so they are serialised by
  the server itself. The lock is the registered model `r2m-loop-lock`: creating a registered
  model is one INSERT under the registry's unique name constraint, so of two machines creating
  it at once exactly one succeeds (the other gets RESOURCE_ALREADY_EXISTS and waits); deleting
  it releases the lock. It needs nothing but the tracking URI every client already has (no
  database credentials, no Prefect server for `r2m run`). A holder that dies without releasing
  it stops its heartbeat (a tag rewritten every `beat_s`); a waiter that sees the heartbeat
  unchanged for `ttl_s` of its own clock (no clock skew between machines) breaks the lock once:
  breaking is itself claimed by creating `r2m-loop-lock.broken.<token>`, so two waiters never
  both break it.

With both held, a second loop against the same server (another machine, another project
folder) starts only when the first has registered and released everything, so it never
registers a duplicate specialist or candidate version and never interleaves an alias move.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from r2m.config import Params
from r2m.errors import R2MError
from r2m.tracking.registry import BROKEN_LOCK as BROKEN
from r2m.tracking.registry import LOCK_MODEL as REGISTRY_LOCK

LOCK_FILE = ".r2m.lock"
TTL_S = 120.0  # a heartbeat unchanged this long (waiter's clock): the holder is dead
BEAT_S = 10.0  # how often the holder rewrites its heartbeat
POLL_S = 1.0  # how often a waiter looks again

log = logging.getLogger("r2m.lock")


class LoopBusy(R2MError):
    """Another loop run holds the project lock."""


def lock_path(params: Params) -> Path:
    return params.path("artifacts") / LOCK_FILE


def _holder_info() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _describe(info: dict | None) -> str:
    if not isinstance(info, dict) or "pid" not in info:
        return "holder unknown"
    return f"pid {info['pid']} on {info.get('host', '?')} since {info.get('since', '?')}"


def _holder(path: Path) -> str:
    """Who holds the lock, as its holder wrote it (best effort: it is written after locking)."""
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "holder unknown"
    return _describe(info)


@contextmanager
def project_lock(params: Params, *, wait: bool = True, timeout_s: float | None = None,
                 on_wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the project's loop lock for the `with` block: the file lock, and with a tracking
    server also the registry lock (see the module docstring).

    Free: taken at once. Held by another process: with `wait` block until it is released
    (at most `timeout_s` seconds when given), telling `on_wait` once; without `wait` raise
    `LoopBusy`. Not re-entrant: a second `project_lock` in the same process waits for the first.
    """
    from r2m.tracking.mlflow_store import is_local

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with ExitStack() as stack:
        path = stack.enter_context(file_lock(params, wait=wait, timeout_s=timeout_s, on_wait=on_wait))
        if not is_local(params.tracking_uri):
            from r2m.tracking.mlflow_store import client

            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            stack.enter_context(registry_lock(client(params), wait=wait, timeout_s=left, on_wait=on_wait,
                                              where=params.tracking_uri))
        yield path


@contextmanager
def file_lock(params: Params, *, wait: bool = True, timeout_s: float | None = None,
              on_wait: Callable[[str], None] | None = None) -> Iterator[Path]:
    """The per-host part of `project_lock`: `flock(2)` on `<artifacts>/.r2m.lock`."""
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
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_info()).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


# ------------------------------------------------------------------ the registry lock


def _mlflow_error():
    from mlflow.exceptions import MlflowException

    return MlflowException


def _exists_error(err) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_ALREADY_EXISTS" or "already exists" in str(err).lower()


def _lock_state(client) -> tuple[str, str, dict | None] | None:
    """(token, heartbeat, holder) of the registry lock, or None when nobody holds it."""
    try:
        rm = client.get_registered_model(REGISTRY_LOCK)
    except _mlflow_error() as err:
        if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    tags = rm.tags or {}
    try:
        holder = json.loads(tags.get("holder", "null"))
    except ValueError:
        holder = None
    return tags.get("token", ""), tags.get("beat", ""), holder


def _try_create(client, name: str, tags: dict[str, str], description: str) -> bool:
    """Create registered model `name`: True if we did, False if it exists (someone else did)."""
    try:
        client.create_registered_model(name, tags=tags, description=description)
        return True
    except _mlflow_error() as err:
        if _exists_error(err):
            return False
        raise


def _delete_quietly(client, name: str) -> None:
    try:
        client.delete_registered_model(name)
    except _mlflow_error():
        pass


class _Heartbeat(threading.Thread):
    """Rewrites the lock's `beat` tag every `beat_s` while the lock is ours."""

    def __init__(self, client, token: str, beat_s: float):
        super().__init__(name="r2m-registry-lock-heartbeat", daemon=True)
        self.client, self.token, self.beat_s = client, token, beat_s
        self.done = threading.Event()
        self.lost = False

    def run(self) -> None:
        n = 0
        while not self.done.wait(self.beat_s):
            n += 1
            try:
                state = _lock_state(self.client)
                if state is None or state[0] != self.token:
                    self.lost = True
                    log.error("the registry lock %s was broken by another run (this run stalled for longer "
                              "than the lock's TTL): runs are no longer serialised", REGISTRY_LOCK)
                    return
                self.client.set_registered_model_tag(REGISTRY_LOCK, "beat", str(n))
            except Exception as err:  # the server briefly unreachable: try again next beat
                log.warning("registry lock heartbeat failed: %s", err)


@contextmanager
def registry_lock(client, *, wait: bool = True, timeout_s: float | None = None,
                  on_wait: Callable[[str], None] | None = None, where: str = "the tracking server",
                  ttl_s: float = TTL_S, beat_s: float = BEAT_S, poll_s: float = POLL_S) -> Iterator[str]:
    """Hold the registry lock (`r2m-loop-lock` on the tracking server of `client`) for the
    `with` block; yields its token. Waiting, `timeout_s` and `on_wait` as in `project_lock`;
    a lock whose heartbeat has not changed for `ttl_s` is broken (once, by one waiter)."""
    token = uuid.uuid4().hex
    info = _holder_info()
    tags = {"token": token, "beat": "0", "holder": json.dumps(info, sort_keys=True)}
    description = f"r2m loop lock held by {_describe(info)}; deleted when that run ends"
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    seen: tuple[str, str] | None = None
    seen_at = time.monotonic()
    told = False
    while not _try_create(client, REGISTRY_LOCK, tags, description):
        state = _lock_state(client)
        if state is None:  # released between our create and our look: try again at once
            continue
        other, beat, holder = state
        if not wait:
            raise LoopBusy(f"{where}: another r2m loop run holds the registry lock {REGISTRY_LOCK} "
                           f"({_describe(holder)}); run again when it has finished")
        if not told and on_wait is not None:
            on_wait(f"waiting for the r2m loop run holding {REGISTRY_LOCK} on {where} ({_describe(holder)})")
        told = True
        now = time.monotonic()
        if seen != (other, beat):
            seen, seen_at = (other, beat), now
        elif now - seen_at >= ttl_s:
            # the holder's heartbeat stopped: claim the break (one waiter only), then break it
            if _try_create(client, f"{REGISTRY_LOCK}{BROKEN}{other}", {"broken_by": tags["holder"]},
                           f"{REGISTRY_LOCK} of {_describe(holder)} broken: no heartbeat for {ttl_s:g} s"):
                again = _lock_state(client)
                if again is not None and again[0] == other:
                    log.warning("breaking the registry lock of %s: no heartbeat for %.0f s", _describe(holder), ttl_s)
                    _delete_quietly(client, REGISTRY_LOCK)
                continue
        if deadline is not None and now >= deadline:
            raise LoopBusy(f"{where}: the registry lock {REGISTRY_LOCK} is still held after {timeout_s:g} s "
                           f"({_describe(holder)})")
        time.sleep(poll_s)
    beat = _Heartbeat(client, token, beat_s)
    beat.start()
    try:
        yield token
    finally:
        beat.done.set()
        beat.join(timeout=30)
        try:
            state = _lock_state(client)
            if state is not None and state[0] == token:
                _delete_quietly(client, REGISTRY_LOCK)
        except Exception as err:  # the server unreachable: the waiters break it after ttl_s
            log.warning("could not release the registry lock %s: %s", REGISTRY_LOCK, err)

