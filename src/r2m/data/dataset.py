"""Torch dataset over validated samples, shared by training and evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from r2m.data.generator import Sample
from r2m.data.images import load_image

__all__ = ["ImageDataset", "load_image"]


class ImageDataset(Dataset):
    """`(pixel tensor, label)` pairs for a list of samples; images decoded with `load_image`."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], torch.Tensor]):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        return self.transform(load_image(sample.path)), sample.label

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]
