"""The eval transform in numpy and PIL only: resize, scale to [0, 1], normalise, CHW.

This is the one implementation: training's eval transform (`r2m.data.transforms.build_transform(False,
...)`) resizes with it, and the ONNX server prepares every upload with it, without torch. The
exported model records the numbers it needs (`r2m.preprocessing`: image size, mean, std,
interpolation; see deploy/README.md, "The model").
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

INTERPOLATION = "bilinear"  # must equal r2m.models.preprocessing()["interpolation"] (the served model)
PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def resize_square(image: Image.Image, image_size: int, interpolation: str = INTERPOLATION) -> Image.Image:
    """Resize to image_size × image_size (no crop, as DF40), with PIL's antialiasing filter."""
    if image.size == (image_size, image_size):
        return image
    return image.resize((image_size, image_size), PIL_FILTERS[interpolation])


def to_pixel_array(
    image: Image.Image,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = INTERPOLATION,
) -> np.ndarray:
    """Eval preprocessing of one RGB image: float32 [3, H, W], (x/255 − mean)/std."""
    pixels = np.asarray(resize_square(image.convert("RGB"), image_size, interpolation), dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


__all__ = ["INTERPOLATION", "PIL_FILTERS", "resize_square", "to_pixel_array"]
