"""The server's preprocessing: `r2m.runtime.preprocess` (kept so `r2m.serving.preprocess` still imports)."""

from r2m.runtime.preprocess import INTERPOLATIONS, Preprocessing

__all__ = ["INTERPOLATIONS", "Preprocessing"]
