"""Classic image-editing operations for forensic pretraining of the tiny θ0 (batched, any device).

The ``manipulation`` proxy task of `r2m.models.pretrain` (docs/pretraining.md) teaches the tower
the low-level cues image forensics starts from, the way ManTra-Net (Wu et al., CVPR 2019) learns
its feature extractor by classifying hundreds of manipulation types on real photographs: a real
crop is left alone or edited by one operation, over the whole image or inside a random soft
region (a splice of the edited copy), and the tower predicts which operation and which patches.

The operations are the textbook ones of camera and editing forensics, none of them a generator
of the embedded benchmark (`r2m.data.demo.families`): no decoder trace, no blending of a
transformed copy's colour, no warp field, no denoiser. They share low-level cues with fakes —
resampling, lost or added high frequencies, block quantisation — as real editing shares them
with real deepfakes.

- ``resample``: down- then up-sampled by a random non-integer factor (bilinear or bicubic;
  Popescu & Farid 2005: interpolation correlations, lost detail);
- ``affine``: a small random rotation/scale/shift resampled bilinearly (geometric editing);
- ``blur``: Gaussian blur, σ ∈ [0.6, 1.6] px;
- ``sharpen``: unsharp masking (amount 0.5–1.5, σ 1 px);
- ``noise``: additive Gaussian noise, 2–8 grey levels;
- ``median``: 3×3 median filter (Kirchner & Fridrich 2010);
- ``jpeg``: 8×8 block DCT quantised with the JPEG luminance table at quality 30–90, on the
  8-px grid of the crop (double-compression and blocking cues; Fridrich et al.).

Every output, the untouched class included, is quantised to 8 bits as the benchmark's PNGs are.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

OPERATIONS = ("none", "resample", "affine", "blur", "sharpen", "noise", "median", "jpeg")

# JPEG Annex K luminance quantisation table (quality 50)
_JPEG_Q50 = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float32,
)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return (lo + (hi - lo) * torch.rand(n, generator=gen)).to(device)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image σ (7 taps, reflect padding)."""
    b, c, h, w = x.shape
    t = torch.arange(-3, 4, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
    k = k / k.sum(1, keepdim=True)  # [b, 7]
    y = F.pad(x.reshape(1, b * c, h, w), (3, 3, 3, 3), mode="reflect")
    kc = k.repeat_interleave(c, 0)
    y = F.conv2d(y, kc.view(b * c, 1, 1, 7), groups=b * c)
    y = F.conv2d(y, kc.view(b * c, 1, 7, 1), groups=b * c)
    return y.view(b, c, h, w)


def _resample(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b, _, h, w = x.shape
    out = torch.empty_like(x)
    factors = _uniform(b, 0.4, 0.85, gen, "cpu")
    modes = torch.randint(0, 2, (b,), generator=gen)
    for i in range(b):
        mode = ("bilinear", "bicubic")[int(modes[i])]
        size = (max(8, round(h * float(factors[i]))), max(8, round(w * float(factors[i]))))
        small = F.interpolate(x[i : i + 1], size=size, mode=mode, antialias=True, align_corners=False)
        out[i] = F.interpolate(small, size=(h, w), mode=mode, align_corners=False)[0]
    return out


def _affine(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    angle = _uniform(b, -math.radians(12), math.radians(12), gen, x.device)
    scale = _uniform(b, 0.8, 1.0, gen, x.device)
    shift = _uniform(2 * b, -0.1, 0.1, gen, x.device).view(b, 2)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _median3(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    patches = F.unfold(F.pad(x, (1, 1, 1, 1), mode="reflect"), 3)  # [b, c*9, h*w]
    return patches.view(b, c, 9, h * w).median(dim=2).values.view(b, c, h, w)


def _dct_matrix(device, dtype) -> torch.Tensor:
    n = torch.arange(8, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d.to(device=device, dtype=dtype)


def _jpeg(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each channel's 8×8 blocks: DCT, quantise with the quality-scaled luminance table, inverse."""
    b, c, h, w = x.shape
    quality = _uniform(b, 30, 90, gen, x.device)
    scale = torch.where(quality < 50, 5000 / quality, 200 - 2 * quality) / 100  # libjpeg's rule
    q = (_JPEG_Q50.to(x.device)[None] * scale[:, None, None]).clamp(1, 255) / 255.0  # [b, 8, 8]
    d = _dct_matrix(x.device, x.dtype)
    blocks = x.reshape(b, c, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5)  # [b, c, H/8, W/8, 8, 8]
    coef = d @ (blocks - 0.5) @ d.T
    qq = q[:, None, None, None]
    coef = torch.round(coef / qq) * qq
    blocks = d.T @ coef @ d + 0.5
    return blocks.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


def apply_operation(name: str, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``x`` [B, 3, H, W] in [0, 1] edited by operation ``name`` (random strength per image)."""
    b = x.shape[0]
    if name == "none":
        return x
    if name == "resample":
        return _resample(x, gen)
    if name == "affine":
        return _affine(x, gen)
    if name == "blur":
        return _gaussian_blur(x, _uniform(b, 0.6, 1.6, gen, x.device))
    if name == "sharpen":
        amount = _uniform(b, 0.5, 1.5, gen, x.device).view(b, 1, 1, 1)
        return x + amount * (x - _gaussian_blur(x, torch.ones(b, device=x.device)))
    if name == "noise":
        sigma = _uniform(b, 2 / 255, 8 / 255, gen, x.device).view(b, 1, 1, 1)
        return x + sigma * torch.randn(x.shape, generator=gen).to(x.device)
    if name == "median":
        return _median3(x)
    if name == "jpeg":
        return _jpeg(x, gen)
    raise ValueError(f"unknown operation '{name}'")


def region_masks(b: int, h: int, w: int, gen: torch.Generator, device) -> torch.Tensor:
    """Soft random ellipses [B, 1, H, W] in [0, 1], covering roughly 10-50 % of the image."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    cy, cx = torch.rand(b, 1, 1, generator=gen) * 0.6 + 0.2, torch.rand(b, 1, 1, generator=gen) * 0.6 + 0.2
    ry, rx = torch.rand(b, 1, 1, generator=gen) * 0.25 + 0.15, torch.rand(b, 1, 1, generator=gen) * 0.25 + 0.15
    r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    edge = torch.rand(b, 1, 1, generator=gen) * 0.3 + 0.05
    return torch.clamp((1 - r) / edge, 0, 1).unsqueeze(1).to(device)


def manipulate(x: torch.Tensor, gen: torch.Generator, local_p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Edit each image of ``x`` by a uniformly drawn operation of `OPERATIONS`, over the whole
    image or (with probability ``local_p``) inside a soft random region.

    Returns (edited images quantised to 8 bits, operation index [B], per-pixel edit weight
    [B, 1, H, W]: 0 where nothing changed, 1 where the operation applies fully)."""
    b, _, h, w = x.shape
    labels = torch.randint(0, len(OPERATIONS), (b,), generator=gen)
    local = torch.rand(b, generator=gen) < local_p
    weight = torch.ones(b, 1, h, w, device=x.device)
    masks = region_masks(b, h, w, gen, x.device)
    weight = torch.where(local.to(x.device).view(b, 1, 1, 1), masks, weight)
    weight = weight * (labels != 0).to(x.device, x.dtype).view(b, 1, 1, 1)
    out = x.clone()
    for k, name in enumerate(OPERATIONS):
        idx = (labels == k).nonzero().squeeze(1)
        if k == 0 or idx.numel() == 0:
            continue
        idx_d = idx.to(x.device)
        edited = apply_operation(name, x[idx_d], gen)
        out[idx_d] = weight[idx_d] * edited + (1 - weight[idx_d]) * x[idx_d]
    out = torch.round(out.clamp(0, 1) * 255) / 255
    return out, labels.to(x.device), weight
