"""Measurable image statistics that show each family's artifact, and the global ones that must not.

Used by the tests (each family's artifact is present) and by `bench/demo_sanity.py` (no global
statistic gives the label away). Images are float [H, W, C] in [0, 1] or uint8 [H, W, 3].
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _grey(img: np.ndarray) -> np.ndarray:
    x = np.asarray(img, dtype=np.float64)
    if x.max() > 1.0:
        x = x / 255.0
    return x.mean(axis=2) if x.ndim == 3 else x


def global_statistics(img: np.ndarray) -> np.ndarray:
    """Per-image mean and std of the pixels, per channel: [mean_R, mean_G, mean_B, std_R, std_G, std_B]."""
    x = np.asarray(img, dtype=np.float64)
    x = x / 255.0 if x.max() > 1.0 else x
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    return np.concatenate([x.mean((0, 1)), x.std((0, 1))])


def spectral_peak_ratio(img: np.ndarray, factor: int, harmonics: tuple[int, ...] | None = None) -> float:
    """Energy at the upsampling frequencies k·H/factor over their neighbourhood.

    A ×factor upsampler adds periodic energy at multiples of H/factor in the power spectrum of
    the high-pass image (Zhang et al. 2019; Frank et al. 2020). ``harmonics`` picks k (default
    1 … factor−1); odd k of factor 8 are reached by period-8 traces only, not by ×2/×4 ones.
    """
    x = _grey(img)
    x = x - ndimage.gaussian_filter(x, 2.0, mode="reflect")  # high-pass: content is mostly low-frequency
    power = np.abs(np.fft.fft2(x)) ** 2
    h, w = power.shape
    peaks, around = [], []
    for k in harmonics or range(1, factor):
        for fy, fx in ((k * h // factor, 0), (0, k * w // factor), (k * h // factor, k * w // factor)):
            peaks.append(power[fy, fx])
            ring = power[np.ix_([(fy - 1) % h, fy, (fy + 1) % h], [(fx - 1) % w, fx, (fx + 1) % w])]
            around.append((ring.sum() - power[fy, fx]) / 8)
    return float(np.sum(peaks) / (np.sum(around) + 1e-12))


def high_frequency_ratio(img: np.ndarray) -> float:
    """Share of the detail energy in the finest scale: var(x − G₁x) / var(x − G₄x).

    Denoising (the diffusion-like family) and resampling (FR) remove the finest scale first.
    """
    x = _grey(img)
    fine = x - ndimage.gaussian_filter(x, 1.0, mode="reflect")
    coarse = x - ndimage.gaussian_filter(x, 4.0, mode="reflect")
    return float(fine.var() / (coarse.var() + 1e-12))


def difference_scales(fake: np.ndarray, source: np.ndarray) -> tuple[float, float]:
    """(low-frequency, high-frequency) energy of fake − source, split by a Gaussian of σ = 3 px.

    FS changes colour/illumination inside a blended region: mostly low-frequency. FR moves
    geometry: the difference sits on edges, mostly high-frequency.
    """
    d = _grey(fake) - _grey(source)
    low = ndimage.gaussian_filter(d, 3.0, mode="reflect")
    return float((low**2).mean()), float(((d - low) ** 2).mean())


def difference_concentration(fake: np.ndarray, source: np.ndarray, share: float = 0.25) -> float:
    """Fraction of the energy of fake − source held by the ``share`` most changed pixels (blurred).

    Local manipulations (FS blending, inpainting) concentrate the change in one region;
    whole-image processes (EFS, diffusion-like) spread it over the image.
    """
    d = ndimage.gaussian_filter(_grey(fake) - _grey(source), 0.0) ** 2
    local = ndimage.uniform_filter(d, 5, mode="reflect").ravel()
    k = max(1, int(share * local.size))
    top = np.sort(local)[-k:]
    return float(top.sum() / (local.sum() + 1e-12))


def blockiness(img: np.ndarray, block: int = 8) -> float:
    """Mean absolute step across the 8×8 JPEG block boundaries over the mean step elsewhere.

    The FS family's swapped-in copy carries JPEG block traces the rest of the image lacks;
    natural crops at random positions give ≈ 1.
    """
    x = _grey(img)
    ratios = []
    for steps in (np.abs(np.diff(x, axis=1)), np.abs(np.diff(x, axis=0).T)):
        at_boundary = (np.arange(steps.shape[1]) + 1) % block == 0
        ratios.append(steps[:, at_boundary].mean() / (steps[:, ~at_boundary].mean() + 1e-12))
    return float(np.mean(ratios))


def edge_share(fake: np.ndarray, source: np.ndarray, share: float = 0.25) -> float:
    """Fraction of the energy of fake − source on the ``share`` strongest edges of the source.

    A geometric warp (FR) changes pixels where the image has edges — moving a flat area changes
    nothing — while recolouring (FS) also changes flat areas.
    """
    src = _grey(source)
    grad = np.hypot(ndimage.sobel(src, 0), ndimage.sobel(src, 1))
    d = (_grey(fake) - src) ** 2
    edges = grad >= np.quantile(grad, 1 - share)
    return float(d[edges].sum() / (d.sum() + 1e-12))


def detail_loss(fake: np.ndarray, source: np.ndarray) -> float:
    """Correlation of the (low-passed) change with minus the source's mid-band detail.

    Noise-then-denoise reconstruction (the diffusion-like family) gives back a smoothed image:
    the change is the detail it lost, so the correlation is high; a process that adds a trace or
    moves pixels leaves it near 0. The σ = 1 low-pass discards period-2 decoder traces.
    """
    src = _grey(source)
    change = ndimage.gaussian_filter(_grey(fake) - src, 1.0)
    detail = ndimage.gaussian_filter(src - ndimage.gaussian_filter(src, 2.0), 1.0)
    return float(np.corrcoef(change.ravel(), -detail.ravel())[0, 1])
