"""Image transforms: the DF40 training recipe (paper B.2) and the eval transform.

Training, as DF40's data loader does it: resize to the model's input size, then h-flip, rotate
±10°, Gaussian blur with an odd kernel in 3-7, brightness and contrast ±0.1 and a JPEG re-encode
at quality 40-100, each applied with its own probability from `train.augment`; then to a float
tensor normalised by the recipe's mean/std. Every random draw comes from torch's global RNG, so
a seeded run (and DataLoader workers seeded by torch) is deterministic.

Evaluation and serving: resize + normalise only. The resize and the numpy eval transform live in
`r2m.data.pixels` (numpy and PIL, no torch: the ONNX server's preprocessing); this module
re-exports them, and its eval transform resizes with the same function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from r2m.config import AugmentConfig, TrainConfig
from r2m.data.pixels import INTERPOLATION, resize_square, to_pixel_array

__all__ = ["INTERPOLATION", "OddKernelGaussianBlur", "build_transform", "df40_augmentations", "resize_square",
           "to_pixel_array"]


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
