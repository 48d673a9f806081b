"""Real photographs that installed wheels ship, cut into source regions and crops.

Two real domains (the analogue of the paper's FF++ and Celeb-DF):
- ``faces``: the 100 face images of scikit-image's ``lfw_subset`` (Labeled Faces in the Wild,
  25×25 grey) plus the faces in ``astronaut`` (Eileen Collins) and matplotlib's ``grace_hopper``;
- ``scenes``: general photographs (scikit-image, scikit-learn and matplotlib sample images) cut
  into a grid of disjoint regions, so a *source* is a (photo, region) pair such as ``chelsea-r3``.

A source is the unit that splits never straddle (its id is the group id, the file stem before
``__``); two crops of one source may overlap, crops of two sources never share a pixel.
Everything loads from files inside installed packages: nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

DOMAINS = ("faces", "scenes")


@dataclass(frozen=True)
class Source:
    """One group of crops: a region ``box = (top, left, height, width)`` of one photograph."""

    id: str
    photo: str
    box: tuple[int, int, int, int]
    min_frac: float  # smallest crop side as a fraction of the region's shorter side


def _skimage(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def _sklearn(name: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    return load_sample_image(name)


def _matplotlib(name: str) -> np.ndarray:
    from matplotlib.cbook import get_sample_data

    with get_sample_data(name, asfileobj=True) as f:
        return np.asarray(Image.open(f).convert("RGB"))


def _skimage_file(name: str) -> np.ndarray:
    """A photo bundled in skimage/data without a loader function of its own."""
    from pathlib import Path

    import skimage.data

    return np.asarray(Image.open(Path(skimage.data.__file__).parent / name).convert("RGB"))


# General photographs (the scenes domain): loader, and grid of disjoint regions (rows, cols).
# Microscopy, fundus, text scans and synthetic charts are left out: they are not camera photos.
SCENE_PHOTOS: dict[str, tuple] = {
    "astronaut": (lambda: _skimage("astronaut"), (4, 4)),
    "chelsea": (lambda: _skimage("chelsea"), (3, 4)),
    "coffee": (lambda: _skimage("coffee"), (3, 4)),
    "rocket": (lambda: _skimage("rocket"), (3, 4)),
    "hubble": (lambda: _skimage("hubble_deep_field"), (4, 4)),
    "camera": (lambda: _skimage("camera"), (4, 4)),
    "grass": (lambda: _skimage("grass"), (3, 3)),
    "gravel": (lambda: _skimage("gravel"), (3, 3)),
    "brick": (lambda: _skimage("brick"), (3, 3)),
    "coins": (lambda: _skimage("coins"), (2, 3)),
    "moon": (lambda: _skimage("moon"), (3, 3)),
    "motorcycle": (lambda: _skimage_file("motorcycle_left.png"), (3, 4)),
    "china": (lambda: _sklearn("china.jpg"), (3, 4)),
    "flower": (lambda: _sklearn("flower.jpg"), (3, 4)),
    "grace-hopper": (lambda: _matplotlib("grace_hopper.jpg"), (3, 3)),
}

# Faces in the general photographs, (top, left, height, width); found once with scikit-image's
# LBP frontal-face cascade (`skimage.feature.Cascade`) and fixed here so loading stays cheap.
# Scene regions that overlap these boxes are dropped, so the two domains share no pixels.
PHOTO_FACES: dict[str, tuple[int, int, int, int]] = {
    "astronaut": (66, 174, 96, 96),
    "grace-hopper": (123, 166, 201, 201),
}

LFW_FACES = 100  # lfw_subset holds 100 faces followed by 100 non-face patches


@lru_cache(maxsize=None)
def photo(name: str) -> np.ndarray:
    """The photograph ``name`` as uint8 [H, W, C] with C = 1 (grey) or 3 (colour)."""
    if name.startswith("lfw-"):
        faces = _lfw()
        return faces[int(name.removeprefix("lfw-"))][..., None]
    img = np.asarray(SCENE_PHOTOS[name][0]())
    if img.ndim == 2:
        return img[..., None]
    img = img[..., :3]
    if np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2]):
        return img[..., :1].copy()
    return img


@lru_cache(maxsize=1)
def _lfw() -> np.ndarray:
    faces = _skimage("lfw_subset")[:LFW_FACES]
    return np.round(faces * 255.0).astype(np.uint8)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _grid(name: str, shape: tuple[int, ...], rows: int, cols: int) -> list[Source]:
    h, w = shape[0] // rows, shape[1] // cols
    face = PHOTO_FACES.get(name)
    sources = []
    for r in range(rows):
        for c in range(cols):
            box = (r * h, c * w, h, w)
            if face and _overlaps(box, face):
                continue
            sources.append(Source(f"{name}-r{r * cols + c}", name, box, min_frac=0.5))
    return sources


@lru_cache(maxsize=None)
def domain_sources(domain: str) -> tuple[Source, ...]:
    """The source regions of a real domain, in a fixed order."""
    if domain == "faces":
        lfw = [Source(f"lfw-{i:03d}", f"lfw-{i:03d}", (0, 0, 25, 25), 0.76) for i in range(LFW_FACES)]
        photo_faces = [
            Source(f"{name}-face", name, box, 0.8) for name, box in PHOTO_FACES.items()
        ]
        return tuple(lfw + photo_faces)
    if domain == "scenes":
        out: list[Source] = []
        for name, (_, (rows, cols)) in SCENE_PHOTOS.items():
            out += _grid(name, photo(name).shape, rows, cols)
        return tuple(out)
    raise ValueError(f"unknown demo domain '{domain}' (expected one of {DOMAINS})")


def sample_crop(source: Source, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop of ``source`` (random side, position, mirror), resized to ``size``.

    Returns float32 [size, size, C] in [0, 1]; C = 1 for grey photographs.
    """
    img = photo(source.photo)
    top, left, h, w = source.box
    short = min(h, w)
    side = rng.uniform(source.min_frac, 1.0) * short
    y = top + rng.uniform(0.0, h - side)
    x = left + rng.uniform(0.0, w - side)
    pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
    # Lanczos when shrinking (anti-aliased), bicubic when enlarging the small LFW faces.
    resample = Image.Resampling.LANCZOS if side >= size else Image.Resampling.BICUBIC
    crop = pil.resize((size, size), resample=resample, box=(x, y, x + side, y + side))
    out = np.asarray(crop, dtype=np.float32) / 255.0
    if out.ndim == 2:
        out = out[..., None]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)
