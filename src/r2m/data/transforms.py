"""Image transforms: the DF40 training recipe (paper B.2, SPEC section 4) and the eval transform.

Training, as DF40's data loader does it: resize to the model's input size, then h-flip, rotate
±10°, Gaussian blur with an odd kernel in 3-7, brightness and contrast ±0.1 and a JPEG re-encode
at quality 40-100, each applied with its own probability from `train.augment`; then to a float
tensor normalised by the recipe's mean/std. Every random draw comes from torch's global RNG, so
a seeded run (and DataLoader workers seeded by torch) is deterministic.

Evaluation and serving: resize + normalise only (`to_pixel_array` is the one implementation,
numpy-only so the ONNX server needs no torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from r2m.config import AugmentConfig, TrainConfig

INTERPOLATION = "bilinear"  # must equal r2m.models.preprocessing()["interpolation"] (the served model)
_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def resize_square(image: Image.Image, image_size: int, interpolation: str = INTERPOLATION) -> Image.Image:
    """Resize to image_size × image_size (no crop, as DF40), with PIL's antialiasing filter."""
    if image.size == (image_size, image_size):
        return image
    return image.resize((image_size, image_size), _PIL_FILTERS[interpolation])


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


class _ResizeSquare(torch.nn.Module):
    def __init__(self, image_size: int, interpolation: str):
        super().__init__()
        self.image_size, self.interpolation = image_size, interpolation

    def forward(self, image: Image.Image) -> Image.Image:
        return resize_square(image.convert("RGB"), self.image_size, self.interpolation)


class OddKernelGaussianBlur(torch.nn.Module):
    """Gaussian blur with an odd kernel size drawn uniformly from [low, high] (DF40's `blur_limit`).

    σ follows the kernel size as OpenCV does for σ = 0: σ = 0.3·((k − 1)/2 − 1) + 0.8.
    """

    def __init__(self, kernel_range: Sequence[int]):
        super().__init__()
        low, high = kernel_range
        self.kernels = [k for k in range(low, high + 1) if k % 2 == 1]
        if not self.kernels:
            raise ValueError(f"blur_kernel {tuple(kernel_range)} holds no odd kernel size")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        k = self.kernels[int(torch.randint(len(self.kernels), ()))]
        sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
        return F.gaussian_blur(image, [k, k], [sigma, sigma])


def _maybe(transform: Callable, p: float) -> v2.Transform:
    return v2.RandomApply([transform], p=p)


def df40_augmentations(augment: AugmentConfig) -> list[Callable]:
    """The DF40 `clip.yaml` augmentations on a uint8 image tensor, in DF40's order."""
    return [
        v2.RandomHorizontalFlip(p=augment.hflip_p),
        _maybe(v2.RandomRotation(augment.rotate_limit, interpolation=InterpolationMode.BILINEAR), augment.rotate_p),
        _maybe(OddKernelGaussianBlur(augment.blur_kernel), augment.blur_p),
        _maybe(v2.ColorJitter(brightness=augment.brightness), augment.brightness_p),
        _maybe(v2.ColorJitter(contrast=augment.contrast), augment.contrast_p),
        _maybe(v2.JPEG(quality=augment.jpeg_quality), augment.jpeg_p),
    ]


def build_transform(
    train: bool,
    image_size: int,
    train_cfg: TrainConfig | None = None,
    interpolation: str = INTERPOLATION,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image → normalised float tensor [3, image_size, image_size].

    `train=True` adds the DF40 augmentations of `train_cfg.augment`; `train=False` is the eval
    transform (resize + normalise), equal to `to_pixel_array` up to float rounding.
    """
    train_cfg = train_cfg or TrainConfig()
    steps: list[Callable] = [_ResizeSquare(image_size, interpolation), v2.PILToTensor()]
    if train:
        steps += df40_augmentations(train_cfg.augment)
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(train_cfg.mean), list(train_cfg.std))]
    return v2.Compose(steps)
