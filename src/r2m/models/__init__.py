"""The detector: an open_clip vision tower and a linear real/fake head (docs/method.md, "The detector")."""

from r2m.models.detector import (
    Detector,
    build_detector,
    load_detector,
    pick_device,
    preprocessing,
)
from r2m.models.pretrained import ensure_pretrained

__all__ = [
    "Detector",
    "build_detector",
    "ensure_pretrained",
    "load_detector",
    "pick_device",
    "preprocessing",
]
