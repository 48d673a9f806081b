"""The eval transform as data: what the served model's metadata says to do to an image.

Training's eval transform is resize to `image_size` × `image_size` (PIL, `interpolation`),
scale to [0, 1], then `(x - mean) / std` per channel, CHW (`r2m.data.pixels.to_pixel_array`,
the one implementation; numpy and PIL only). The exported model records these numbers in its
ONNX metadata (`r2m.preprocessing`), so the server needs no params.yaml to prepare an image as
training did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from r2m.data.pixels import PIL_FILTERS, to_pixel_array

INTERPOLATIONS = tuple(sorted(PIL_FILTERS))  # what r2m.data.pixels implements


@dataclass(frozen=True)
class Preprocessing:
    """`image_size`, per-channel `mean`/`std` and the resize `interpolation` of the eval transform."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        """From the `r2m.preprocessing` metadata (or `r2m.models.preprocessing(params)`)."""
        interpolation = str(data.get("interpolation", "bilinear")).lower()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"preprocessing: unknown interpolation '{interpolation}' (one of {list(INTERPOLATIONS)})")
        mean, std = tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"preprocessing: mean/std need 3 values each and std > 0, got {mean}, {std}")
        return cls(int(data["image_size"]), mean, std, interpolation)  # type: ignore[arg-type]

    def as_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    def __call__(self, image: Image.Image) -> np.ndarray:
        """One RGB PIL image -> float32 [3, image_size, image_size] (training's eval transform)."""
        return to_pixel_array(image, self.image_size, self.mean, self.std, self.interpolation)

    def batch(self, images: list[Image.Image]) -> np.ndarray:
        """RGB images -> float32 [B, 3, image_size, image_size]."""
        return np.stack([self(img) for img in images])


__all__ = ["INTERPOLATIONS", "Preprocessing"]
