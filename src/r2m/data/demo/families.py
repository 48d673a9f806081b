"""Generator families of the embedded benchmark: real, documented artifact processes.

Each family turns a real crop (float32 [H, W, C] in [0, 1], C = 1 grey or 3 colour) into a fake
by one of several *variants*, the way the paper's families are unions of methods (FF++ FS is
Deepfakes + FaceSwap + ..., DF40 EFS is many GANs and diffusion models). A variant is picked per
image. Every family leaves a different artifact, so a specialist trained on one family transfers
only partly to the others, and the unseen families share some cues with the seen ones (which
is what merging can exploit). After the artifact, `match_moments` gives the fake the per-channel
mean and standard deviation of the crop it came from, so no global pixel statistic gives the
label away.

Seen families (train specialists): FS (self-blending), FR (smooth local warps), EFS (upsampling
fingerprints). Unseen families (evaluation only, paper Protocol 3): diffusion-like
noise-then-denoise reconstruction, and inpainting-like local resynthesis.

Besides its process cue, each family's output passes through its own generator decoder, whose
upsampling leaves a fixed periodic trace (`_upsampling_fingerprint`): ×8 in the FS blended
region, ×4 in the FR rendered region, ×2/×4 over the whole EFS image, and other filters in the
unseen families. See docs/benchmark.md for why these traces are as strong as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

Image = np.ndarray  # float32 [H, W, C] in [0, 1]
Variant = Callable[[Image, np.random.Generator, float], Image]


# ---------------------------------------------------------------------------------- helpers


def blur(img: Image, sigma: float) -> Image:
    """Gaussian blur of each channel."""
    return ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0), mode="reflect")


def soft_mask(
    shape: tuple[int, int], rng: np.random.Generator, feather: float, radii: tuple[float, float] = (0.2, 0.32)
) -> np.ndarray:
    """A random deformed ellipse near the centre, feathered by a Gaussian of σ = ``feather`` px.

    SBI's mask: a convex face-like region, elastically deformed and blurred (Shiohara &
    Yamasaki 2022, §3.2). Returns float32 [H, W, 1] in [0, 1].
    """
    h, w = shape
    cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6)
    ry, rx = h * rng.uniform(*radii), w * rng.uniform(*radii)
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / rx
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / ry
    theta = np.arctan2(v, u)
    # a smooth random radial deformation (3 harmonics) so masks are not plain ellipses
    k = np.arange(1, 4)[:, None, None]
    wobble = 1 + np.sum(rng.uniform(-0.12, 0.12, (3, 1, 1)) * np.cos(k * theta + rng.uniform(0, 6.3, (3, 1, 1))), 0)
    mask = (np.hypot(u, v) <= wobble).astype(np.float32)
    mask = ndimage.gaussian_filter(mask, feather, mode="constant")
    return mask[..., None]


def warp(img: Image, dy: np.ndarray, dx: np.ndarray) -> Image:
    """Backward warp: out(y, x) = img(y + dy, x + dx), bilinear resampling (reflecting borders)."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    coords = [yy + dy, xx + dx]
    return np.stack(
        [ndimage.map_coordinates(img[..., c], coords, order=1, mode="reflect") for c in range(img.shape[2])],
        axis=-1,
    )


def resize(img: Image, shape: tuple[int, int], order: int = 1) -> Image:
    """Spline resampling (order 0 nearest, 1 bilinear, 3 cubic) to ``shape``."""
    h, w = img.shape[:2]
    zoom = (shape[0] / h, shape[1] / w, 1)
    return ndimage.zoom(img, zoom, order=order, mode="reflect", grid_mode=True)


def area_downsample(img: Image, factor: int) -> Image:
    """Average-pool by ``factor`` (the generator's coarse latent)."""
    h, w, c = img.shape
    return img[: h - h % factor, : w - w % factor].reshape(h // factor, factor, w // factor, factor, c).mean((1, 3))


def match_moments(fake: Image, source: Image) -> Image:
    """Give ``fake`` the per-channel mean and std of ``source`` (a colour-transfer step)."""
    mu_f, sd_f = fake.mean((0, 1)), fake.std((0, 1)) + 1e-6
    mu_s, sd_s = source.mean((0, 1)), source.std((0, 1))
    return np.clip((fake - mu_f) / sd_f * sd_s + mu_s, 0.0, 1.0).astype(np.float32)


def _learned_kernel(seed: int, size: int, spread: float) -> np.ndarray:
    """A fixed 'learned-like' filter: a positive blob plus a fixed random perturbation.

    Seeded by the variant, not the image: a generator's weights are the same for every image,
    which is why its fingerprint is (Marra et al. 2019, "Do GANs leave artificial fingerprints?").
    """
    r = np.random.default_rng(seed)
    ax = np.arange(size) - (size - 1) / 2
    blob = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * (size / 4) ** 2))
    k = blob * (1 + spread * r.standard_normal((size, size)))
    return (k / k.sum()).astype(np.float32)


def _conv(img: Image, kernel: np.ndarray) -> Image:
    return np.stack([ndimage.convolve(img[..., c], kernel, mode="reflect") for c in range(img.shape[2])], -1)


def _upsampling_fingerprint(img: Image, rng: np.random.Generator, s: float, factor: int, kind: str, seed: int) -> Image:
    """Add the residual of a learned-like upsampler over a smooth one: I + a (U_θ(z) − U_bilinear(z)).

    z is the generator's coarse latent (area pooling by ``factor``); U_θ is a transposed
    convolution (zero insertion then a fixed filter, the checkerboard source of Odena et al. 2016)
    or nearest-neighbour upsampling then a fixed 3×3 filter. Their residual is periodic with
    period ``factor``, so the spectrum gets peaks at multiples of H/factor (Zhang et al. 2019,
    "Detecting and simulating artifacts in GAN fake images"; Frank et al. 2020).
    """
    h, w, c = img.shape
    z = area_downsample(img, factor)
    hz, wz = z.shape[0] * factor, z.shape[1] * factor
    if kind == "tconv":
        up = np.zeros((hz, wz, c), np.float32)
        up[::factor, ::factor] = z
        up = _conv(up, _learned_kernel(seed, 2 * factor, 0.6) * factor * factor)
    else:
        up = np.repeat(np.repeat(z, factor, 0), factor, 1)
        up = _conv(up, _learned_kernel(seed, 3, 0.6))
    up = np.pad(up, ((0, h - hz), (0, w - wz), (0, 0)), mode="edge")
    residual = up - resize(z, (h, w), order=1)
    # keep only the high-frequency (periodic) part: the fingerprint, not a shift of the content
    residual = residual - blur(residual, float(factor))
    # a fixed fingerprint energy of 6-12 8-bit levels RMS, equal for every variant: the tiny
    # backbone, trained from its random θ0 with the DF40 augmentations, learns nothing weaker
    # in 3 epochs (docs/benchmark.md); `--strength` scales it
    rms = float(np.sqrt((residual**2).mean())) + 1e-8
    a = rng.uniform(6.0, 12.0) / 255.0 * s / rms
    return (img + a * residual).astype(np.float32)


# ------------------------------------------------------------------------------ FS: face swap


def fs_colour(img: Image, rng: np.random.Generator, s: float) -> Image:
    """Blend in a colour/contrast-jittered copy (SBI's source-target colour augmentation)."""
    c = img.shape[2]
    gain = 1 + rng.choice([-1, 1], c) * rng.uniform(0.05, 0.12, c) * s
    gamma = 1 + rng.choice([-1, 1]) * rng.uniform(0.05, 0.15) * s
    target = np.clip(img, 1e-4, 1) ** gamma * gain
    return _self_blend(img, target, rng, s)


def fs_resolution(img: Image, rng: np.random.Generator, s: float) -> Image:
    """Blend in a down-then-up-sampled copy (SBI's resolution mismatch of the swapped face)."""
    h, w = img.shape[:2]
    f = rng.uniform(1.6, 2.4)
    low = resize(img, (int(h / f), int(w / f)), order=1)
    target = resize(low, (h, w), order=1)
    return _self_blend(img, target, rng, s)


def fs_misalign(img: Image, rng: np.random.Generator, s: float) -> Image:
    """Blend in a slightly shifted and rescaled copy (SBI's landmark misalignment)."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    scale = 1 + rng.choice([-1, 1]) * rng.uniform(0.02, 0.05) * s
    shift = rng.choice([-1, 1], 2) * rng.uniform(0.6, 1.6, 2) * s
    dy = (yy - h / 2) * (scale - 1) + shift[0]
    dx = (xx - w / 2) * (scale - 1) + shift[1]
    target = warp(img, dy, dx)
    target = np.clip(target * (1 + rng.uniform(-0.04, 0.04, img.shape[2]) * s), 0, 1)
    return _self_blend(img, target, rng, s)


def _self_blend(img: Image, target: Image, rng: np.random.Generator, s: float) -> Image:
    """eq. of SBI: I_SB = M ⊙ T(I) + (1 − M) ⊙ I, with a soft mask M scaled by a blend ratio.

    The swapped-in face is the output of the face-swap autoencoder (DeepFakes/FaceSwap decode
    from an 8×8 bottleneck): T(I) carries that decoder's ×8 upsampling trace, period 8 px,
    which the rest of the image lacks.
    """
    h, w = img.shape[:2]
    target = _upsampling_fingerprint(target, rng, s, 8, "tconv", seed=1)
    mask = soft_mask((h, w), rng, feather=rng.uniform(0.8, 2.5) * h / 64, radii=(0.28, 0.42))
    mask = mask * rng.uniform(0.75, 1.0)
    return (mask * target + (1 - mask) * img).astype(np.float32)


# ------------------------------------------------------------------------------- FR: reenactment


def _rendered(img: Image, warped: Image, rng: np.random.Generator, s: float) -> Image:
    """The reenacted region is re-rendered by the motion model's generator and pasted back: inside
    a soft face-like mask the warped image carries the renderer's ×4 nearest-neighbour upsampling
    trace (4-px blocks smoothed by its own fixed 3×3 filter)."""
    h, w = img.shape[:2]
    mask = soft_mask((h, w), rng, feather=3.0 * h / 64, radii=(0.28, 0.42))
    rendered = _upsampling_fingerprint(warped, rng, s, 4, "nearest", seed=5)
    return (mask * rendered + (1 - mask) * img).astype(np.float32)


def fr_elastic(img: Image, rng: np.random.Generator, s: float) -> Image:
    """Elastic warp: a Gaussian-smoothed random displacement field (Simard et al. 2003)."""
    h, w = img.shape[:2]
    amp = rng.uniform(1.0, 2.0) * s * h / 64
    field = ndimage.gaussian_filter(rng.standard_normal((2, h, w)), (0, h / 10, w / 10), mode="wrap")
    field *= amp / (np.abs(field).max() + 1e-8)
    return _rendered(img, warp(img, field[0], field[1]), rng, s)


def fr_thin_plate(img: Image, rng: np.random.Generator, s: float) -> Image:
    """Thin-plate-like warp: a few control points (landmarks) moved, a smooth RBF field between.

    Reenactment moves facial landmarks (mouth, eyes, pose) and warps the rest smoothly
    (e.g. the TPS motion model of Zhao & Zhang, CVPR 2022).
    """
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy = np.zeros((h, w), np.float32)
    dx = np.zeros((h, w), np.float32)
    for _ in range(rng.integers(3, 7)):
        cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
        r = rng.uniform(0.08, 0.16) * h
        bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        move = rng.standard_normal(2)
        move *= rng.uniform(1.2, 2.4) * s * h / 64 / (np.linalg.norm(move) + 1e-8)
        dy += move[0] * bump
        dx += move[1] * bump
    return _rendered(img, warp(img, dy, dx), rng, s)


def fr_local_affine(img: Image, rng: np.random.Generator, s: float) -> Image:
    """A local affine motion (small rotation/scale of a region, e.g. a head turn) blended softly."""
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.deg2rad(rng.choice([-1, 1]) * rng.uniform(2.0, 5.0) * s)
    k = 1 + rng.choice([-1, 1]) * rng.uniform(0.02, 0.05) * s
    cy, cx = h / 2 + rng.uniform(-4, 4), w / 2 + rng.uniform(-4, 4)
    y0, x0 = yy - cy, xx - cx
    dy = (np.cos(a) * y0 - np.sin(a) * x0) / k - y0
    dx = (np.sin(a) * y0 + np.cos(a) * x0) / k - x0
    return _rendered(img, warp(img, dy, dx), rng, s)


# ------------------------------------------------------------------------ EFS: entire synthesis


def efs_tconv2(img: Image, rng: np.random.Generator, s: float) -> Image:
    """×2 transposed convolution with a 4×4 learned-like filter: checkerboard, peaks at H/2."""
    return _upsampling_fingerprint(img, rng, s, 2, "tconv", seed=2)


def efs_nearest2(img: Image, rng: np.random.Generator, s: float) -> Image:
    """×2 nearest-neighbour upsampling then a 3×3 filter: 2-px blocks, peaks at H/2."""
    return _upsampling_fingerprint(img, rng, s, 2, "nearest", seed=3)


def efs_tconv4(img: Image, rng: np.random.Generator, s: float) -> Image:
    """×4 transposed convolution with an 8×8 learned-like filter: peaks at multiples of H/4."""
    return _upsampling_fingerprint(img, rng, s, 4, "tconv", seed=4)


# -------------------------------------------------------------- unseen: diffusion-like, inpainting


def diff_pixel(img: Image, rng: np.random.Generator, s: float) -> Image:
    """Noise then denoise in pixel space (SDEdit, Meng et al. 2022; the DIRE reconstruction idea,
    Wang et al. 2023): x_t = x + σ ε, then a total-variation denoiser stands in for the model.

    Leaves over-smooth, piecewise-flat textures and no camera noise.
    """
    from skimage.restoration import denoise_tv_chambolle

    sigma = rng.uniform(0.03, 0.06) * s
    noisy = img + sigma * rng.standard_normal(img.shape).astype(np.float32)
    return denoise_tv_chambolle(noisy, weight=1.2 * sigma, channel_axis=-1).astype(np.float32)


def diff_latent(img: Image, rng: np.random.Generator, s: float) -> Image:
    """Noise then denoise in a ×2 latent, decoded by a learned-like upsampler (latent diffusion,
    Rombach et al. 2022): smoothing plus the VAE decoder's ×2 upsampling trace, whose filter
    differs from every EFS variant's.
    """
    h, w = img.shape[:2]
    z = area_downsample(img, 2)
    sigma = rng.uniform(0.03, 0.06) * s
    z = blur(z + sigma * rng.standard_normal(z.shape).astype(np.float32), 0.7)
    detail = img - resize(area_downsample(img, 2), (h, w), order=1)  # the decoder restores part of the detail
    recon = resize(z, (h, w), order=1) + 0.5 * blur(detail, 0.6)
    return _upsampling_fingerprint(recon.astype(np.float32), rng, s, 2, "nearest", seed=7)


def inp_smooth_fill(img: Image, rng: np.random.Generator, s: float) -> Image:
    """Inpainting-like local resynthesis: a region refilled from its surroundings (normalised
    convolution) plus synthetic white noise matched to the image's residual level.

    The fill passes through the inpainting network's decoder (a ×8 upsampling trace with its own
    filter). Leaves a locally texture-less patch whose noise spectrum differs from the camera's
    (Li & Huang, ICCV 2019, "Localization of deep inpainting using high-pass FCN").
    """
    h, w = img.shape[:2]
    hole = soft_mask((h, w), rng, feather=0.5)[..., 0] > 0.5
    hole = ndimage.binary_erosion(hole, iterations=int(rng.integers(2, 5)))
    keep = (~hole).astype(np.float32)[..., None]
    # the smoothing reaches past the hole's centre, so every hole pixel has known pixels to average
    sig = max(rng.uniform(2.5, 4.0) * h / 64, float(ndimage.distance_transform_edt(hole).max()))
    weight = blur(np.broadcast_to(keep, img.shape).copy(), sig)
    fill = blur(img * keep, sig) / np.maximum(weight, 1e-2)
    residual_sd = float((img - blur(img, 1.0)).std())
    fill = fill + rng.standard_normal(img.shape).astype(np.float32) * residual_sd * rng.uniform(0.6, 1.0)
    fill = _upsampling_fingerprint(fill.astype(np.float32), rng, s, 8, "tconv", seed=9)  # the inpainting net's decoder
    m = ndimage.gaussian_filter(hole.astype(np.float32), 1.0)[..., None] * min(1.0, 0.7 * s + 0.3)
    return (m * fill + (1 - m) * img).astype(np.float32)


def inp_patch_copy(img: Image, rng: np.random.Generator, s: float) -> Image:
    """Exemplar-based inpainting (Criminisi et al. 2004; PatchMatch): a region is refilled with
    texture copied from elsewhere in the same image, leaving a seam and duplicated content.
    """
    h, w = img.shape[:2]
    mask = soft_mask((h, w), rng, feather=1.2 * h / 64)
    mask = ndimage.zoom(mask, (0.6, 0.6, 1), order=1)
    mh, mw = mask.shape[:2]
    out = img.copy()
    ty, tx = rng.integers(0, h - mh + 1), rng.integers(0, w - mw + 1)
    sy, sx = rng.integers(0, h - mh + 1), rng.integers(0, w - mw + 1)
    m = mask * min(1.0, 0.7 * s + 0.3)
    out[ty : ty + mh, tx : tx + mw] = m * img[sy : sy + mh, sx : sx + mw] + (1 - m) * img[ty : ty + mh, tx : tx + mw]
    return out


# -------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Family:
    """A generator family: its contract code, role and the variants a fake is drawn from."""

    key: str  # the dataset name prefix, e.g. "fs" in fs-faces
    code: str  # generator.yaml `family`: FS | FR | EFS | FE | other
    role: str  # seen | unseen
    variants: tuple[Variant, ...]
    strength: float = 1.0
    description: str = ""

    def make_fake(self, img: Image, rng: np.random.Generator, strength: float = 1.0) -> tuple[Image, str]:
        """Apply one randomly chosen variant at ``strength`` × the family's own strength, then
        match the crop's moments. Returns (fake, variant name)."""
        variant = self.variants[int(rng.integers(len(self.variants)))]
        fake = variant(img, rng, self.strength * strength)
        return match_moments(fake, img), variant.__name__


FAMILIES: dict[str, Family] = {
    f.key: f
    for f in (
        Family("fs", "FS", "seen", (fs_colour, fs_resolution, fs_misalign),
               description="self-blended images: a transformed copy blended back with a soft mask"),
        Family("fr", "FR", "seen", (fr_elastic, fr_thin_plate, fr_local_affine),
               description="smooth local warps of the geometry with bilinear resampling"),
        Family("efs", "EFS", "seen", (efs_tconv2, efs_nearest2, efs_tconv4),
               description="upsampling fingerprints of learned-like generator decoders"),
        Family("diff", "other", "unseen", (diff_pixel, diff_latent),
               description="diffusion-like noise-then-denoise reconstruction"),
        Family("inp", "FE", "unseen", (inp_smooth_fill, inp_patch_copy),
               description="inpainting-like local resynthesis of a region"),
    )
}
