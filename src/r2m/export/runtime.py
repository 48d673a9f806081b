"""ONNX Runtime comes from a pip extra (`.[cpu]` or `.[gpu]`, never both): the one place it is imported.

Without the extra, every verb that needs it (`r2m run`, `r2m export`, `r2m serve`) stops with a
one-line `DependencyError` naming the extras instead of a `ModuleNotFoundError` traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from r2m.errors import DependencyError

INSTALL_HINT = "pip install -e '.[cpu]' (or '.[gpu]' on CUDA hosts; never both)"


def import_onnxruntime(module: str = "onnxruntime") -> ModuleType:
    """`onnxruntime` (or one of its submodules), or `DependencyError` naming the extras."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise DependencyError(f"ONNX Runtime is not installed ({err}): {INSTALL_HINT}") from None
