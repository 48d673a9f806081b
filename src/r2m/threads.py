"""How many CPUs this process may really use, for torch, BLAS and ONNX Runtime thread counts.

``os.cpu_count()`` counts the machine's cores; a container, a cgroup CPU quota or a CPU affinity
mask (``taskset``, a scheduler's cpuset) may give the process fewer. Thread pools sized beyond
what the process gets spin against each other and against other jobs on the same cores.

The policy (docs/usage.md, "Running beside other jobs"): torch's intra-op threads and the OpenMP/BLAS
pools get ``usable_cpus()`` threads, and OpenMP threads wait *passively* (``OMP_WAIT_POLICY=PASSIVE``:
a thread with nothing to do sleeps instead of spinning for its next parallel region, so it
leaves the core to the other job). OpenMP reads its environment once, when torch loads it, so
``set_thread_env()`` runs before torch is imported (the CLI and the flows call it first thing);
``configure_torch()`` sets torch's own count where training starts. Every variable is a default:
a value the user exported wins. ``R2M_THREADS=N`` asks for N threads; ``R2M_THREADS=library``
leaves every setting to the libraries (the behaviour before this policy, for comparison:
bench/threads_bench.py).
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup's quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), None if unlimited."""
    v2 = Path("/sys/fs/cgroup/cpu.max")
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        if v1.is_file():
            quota = int(v1.read_text())
            period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by the cgroup quota (at least 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


THREADS_ENV = "R2M_THREADS"
LIBRARY = "library"  # R2M_THREADS=library: r2m sets nothing, the libraries' defaults apply
# what OpenMP and the BLAS libraries read when they load; the thread counts get thread_count()
COUNT_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# idle threads sleep instead of spinning: GNU OpenMP (torch's bundled libgomp) reads
# OMP_WAIT_POLICY, Intel/LLVM OpenMP also KMP_BLOCKTIME (milliseconds of spinning before sleep)
WAIT_VARS = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


def _positive_int(text: str | None) -> int | None:
    """The first entry of an OpenMP-style count ("4", "4,2") when it is a positive integer."""
    try:
        n = int((text or "").split(",")[0].strip())
    except ValueError:
        return None
    return n if n >= 1 else None


def thread_count() -> int | None:
    """The threads r2m gives torch and the math libraries: ``R2M_THREADS=N``, else the
    ``OMP_NUM_THREADS`` in force, else ``usable_cpus()``; None with ``R2M_THREADS=library``."""
    setting = os.environ.get(THREADS_ENV, "").strip()
    if setting.lower() == LIBRARY:
        return None
    return _positive_int(setting) or _positive_int(os.environ.get("OMP_NUM_THREADS")) or usable_cpus()


def set_thread_env() -> int | None:
    """Thread counts and passive waiting as environment defaults, for OpenMP and BLAS to read
    when they load: call it before torch or numpy is imported. Returns the thread count."""
    n = thread_count()
    if n is None:
        return None
    for var in COUNT_VARS:
        os.environ.setdefault(var, str(n))
    for var, value in WAIT_VARS.items():
        os.environ.setdefault(var, value)
    return n


def configure_torch() -> int | None:
    """Set torch's intra-op threads to ``thread_count()`` (where a training or scoring loop
    starts); returns the count set, None with ``R2M_THREADS=library``."""
    n = thread_count()
    if n is None:
        return None
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


__all__ = ["COUNT_VARS", "THREADS_ENV", "WAIT_VARS", "configure_torch", "set_thread_env", "thread_count", "usable_cpus"]
