"""Where ONNX Runtime is imported: `r2m.runtime.session` (kept so `r2m.export.runtime` still imports)."""

from r2m.runtime.session import INSTALL_HINT, import_onnxruntime

__all__ = ["INSTALL_HINT", "import_onnxruntime"]
