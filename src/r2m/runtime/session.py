"""ONNX Runtime: the one place it is imported, and the one way a session is opened.

ONNX Runtime comes from a pip extra (`.[cpu]` or `.[gpu]`, never both). Without it, every verb
that needs it (`r2m run`, `r2m export`, `r2m serve`) stops with a one-line `DependencyError`
naming the extras instead of a `ModuleNotFoundError` traceback.

Every session r2m opens (the server's, export's parity and int8 checks, the benchmarks') gets
intra-op threads = min(requested, `r2m.threads.usable_cpus()`) and no busy spinning
(`session.intra_op.allow_spinning` = `session.inter_op.allow_spinning` = "0"): ONNX Runtime's
default spins its worker threads between calls, which burns the cores a training job or the
server's own HTTP handling beside it needs.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from r2m.errors import DependencyError
from r2m.threads import usable_cpus

INSTALL_HINT = "pip install -e '.[cpu]' (or '.[gpu]' on CUDA hosts; never both)"
NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


def import_onnxruntime(module: str = "onnxruntime") -> ModuleType:
    """`onnxruntime` (or one of its submodules), or `DependencyError` naming the extras."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise DependencyError(f"ONNX Runtime is not installed ({err}): {INSTALL_HINT}") from None


def session_threads(requested: int) -> int:
    """Intra-op threads for a session: what was asked, at most the CPUs this process may use."""
    return max(1, min(int(requested), usable_cpus()))


def session_options(threads: int = 1) -> Any:
    """`SessionOptions` with `session_threads(threads)` intra-op threads, one inter-op thread and
    no spinning; quiet logging."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = session_threads(threads)
    options.inter_op_num_threads = 1
    for key, value in NO_SPINNING.items():
        options.add_session_config_entry(key, value)
    options.log_severity_level = 3
    return options


def open_session(path: Path | str, threads: int = 1, providers: Sequence[str] | None = None,
                 options: Any = None) -> Any:
    """An ONNX Runtime session on `path`: CUDA provider when available, else CPU.

    `options` (from `session_options`, e.g. with profiling turned on) replaces the default ones."""
    ort = import_onnxruntime()
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), sess_options=options or session_options(threads), providers=list(providers))


__all__ = ["INSTALL_HINT", "NO_SPINNING", "import_onnxruntime", "open_session", "session_options", "session_threads"]
