"""Proxy pretraining of the tiny offline θ0 on real photographs (no labels, no fakes).

Weight-space merging assumes the specialists are fine-tuned from a *pretrained* θ0: their task
vectors τ_i = θ_i − θ0 then stay small and in one basin, where averaging them keeps each task
(paper §3; the linear regime of task arithmetic). Fine-tuning a random init is training from
scratch, and merges of such models collapse. Real runs start from CLIP; the embedded demo has no
weights to download, so `ensure_pretrained` pretrains the tiny open_clip tower here first.

Data: random crops of the real-photo pool of the embedded benchmark (`r2m.data.demo.sources`:
the photographs scikit-image, scikit-learn and matplotlib ship, both real domains). No fake image
and no generator artifact process is ever used, so θ0 knows nothing of the detection tasks.

Proxy tasks (self-supervised, summed):
- ``rotation``: predict which of 0/90/180/270° the crop was turned by, from the pooled token
  (Gidaris et al. 2018): global structure and orientation;
- ``masked``: SimMIM-style masked-patch prediction: a random ``mask_ratio`` of the patches is
  replaced by the image mean and the tower regresses their pixels (L1) from its patch tokens:
  local texture and colour statistics, the low-level features forensics needs;
- ``source``: classify which source region of the pool a crop comes from (instance discrimination);
- ``manipulation``: forensic pretraining (ManTra-Net-style): the crop is left alone or edited by
  one classic operation (`r2m.models.manipulations`: resampling, affine, blur, sharpen, noise,
  median, JPEG), globally or inside a soft random region; the tower predicts the operation from
  its pooled token and, from its patch tokens, how much of each patch was edited.

Deterministic on CPU for a given seed (crops from a numpy stream, torch seeded).
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from r2m.checkpoint import BACKBONE_PREFIX
from r2m.config import Params
from r2m.models.detector import build_detector, image_size, pick_device
from r2m.models.manipulations import OPERATIONS, manipulate


@dataclass
class PretrainResult:
    tensors: dict[str, torch.Tensor]  # backbone tensors in the checkpoint contract (`backbone.` keys)
    history: list[dict] = field(default_factory=list)  # one row per epoch: the proxy losses
    seconds: float = 0.0


def _sources() -> list:
    from r2m.data.demo.sources import DOMAINS, domain_sources

    return [s for domain in DOMAINS for s in domain_sources(domain)]


_CHUNK = 256  # crops per independently seeded chunk (chunks are drawn in parallel)


def _crop_chunk(args: tuple) -> np.ndarray:
    from r2m.data.demo.sources import sample_crop

    pool, order, size, seed, epoch, chunk = args
    rng = np.random.default_rng([seed, epoch, chunk, zlib.crc32(b"r2m-pretrain-crops")])
    images = np.empty((len(order), size, size, 3), dtype=np.float32)
    for i, idx in enumerate(order):
        crop = sample_crop(pool[idx], rng, size)
        images[i] = crop if crop.shape[2] == 3 else np.repeat(crop, 3, axis=2)
    return images


def proxy_crops(n_images: int, size: int, seed: int, epoch: int, workers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_images`` random crops of the real-photo pool, [n, 3, size, size] in [0, 1], and the
    index of each crop's source region. Sources are drawn round-robin in a seeded order; the
    crops of each chunk of `_CHUNK` come from their own seeded stream, so ``workers`` processes
    give the same crops as one."""
    pool = _sources()
    rng = np.random.default_rng([seed, epoch, zlib.crc32(b"r2m-pretrain")])
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(math.ceil(n_images / len(pool)))])[:n_images]
    jobs = [(pool, order[i : i + _CHUNK], size, seed, epoch, i // _CHUNK) for i in range(0, n_images, _CHUNK)]
    if workers > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor
        import multiprocessing

        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("fork")) as ex:
            chunks = list(ex.map(_crop_chunk, jobs))
    else:
        chunks = [_crop_chunk(job) for job in jobs]
    images = np.concatenate(chunks)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(order.astype(np.int64))


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/p)(W/p), p·p·C], patches in the ViT's token order (row-major)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def mask_patches(images: torch.Tensor, patch: int, ratio: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a random ``ratio`` of each image's patches by the image's mean colour.

    Returns (masked images, mask [B, tokens] bool)."""
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    n_mask = max(1, round(ratio * gh * gw))
    noise = torch.rand(b, gh * gw, generator=generator)
    mask = torch.zeros(b, gh * gw, dtype=torch.bool)
    mask.scatter_(1, noise.argsort(dim=1)[:, :n_mask], True)
    pixel_mask = mask.reshape(b, 1, gh, 1, gw, 1).expand(b, c, gh, patch, gw, patch).reshape(b, c, h, w)
    pixel_mask = pixel_mask.to(images.device)
    fill = images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    return torch.where(pixel_mask, fill, images), mask


class ProxyHeads(nn.Module):
    """The pretext heads on top of the tower; thrown away after pretraining."""

    def __init__(self, width: int, patch: int, n_sources: int, tasks: tuple[str, ...]):
        super().__init__()
        self.rotation = nn.Linear(width, 4) if "rotation" in tasks else None
        self.masked = nn.Linear(width, patch * patch * 3) if "masked" in tasks else None
        self.source = nn.Linear(width, n_sources) if "source" in tasks else None
        self.operation = nn.Linear(width, len(OPERATIONS)) if "manipulation" in tasks else None
        self.edited = nn.Linear(width, 1) if "manipulation" in tasks else None


def _lr_at(step: int, total: int, base: float, warmup: float) -> float:
    """Linear warm-up over the first ``warmup`` fraction of the steps, then cosine decay to 0."""
    warm = max(1, int(warmup * total))
    if step < warm:
        return base * (step + 1) / warm
    return base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def run_pretraining(params: Params, progress: bool = True) -> PretrainResult:
    """Pretrain the configured tower from its seeded random init (`model.init_seed`) on the proxy
    tasks of `pretrain.tasks`; returns the backbone tensors and the per-epoch losses."""
    cfg = params.pretrain
    device = pick_device()
    torch.manual_seed(params.model.init_seed)
    detector = build_detector(params.model)  # the very init θ0 would be without pretraining
    tower = detector.backbone.to(device)
    width = detector.head.in_features
    patch = tower.conv1.kernel_size[0]
    size = image_size(params.model.name)
    n_sources = len(_sources())

    torch.manual_seed(cfg.seed)
    heads = ProxyHeads(width, patch, n_sources, cfg.tasks).to(device)
    generator = torch.Generator().manual_seed(cfg.seed)
    mean = torch.tensor(params.train.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(params.train.std, device=device).view(1, 3, 1, 1)

    decay = [p for n, p in tower.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in tower.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay + list(heads.parameters()), "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    steps_per_epoch = math.ceil(cfg.n_images / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    was_output_tokens = tower.output_tokens
    tower.output_tokens = True
    tower.train()
    history: list[dict] = []
    started = time.perf_counter()
    step = 0
    bar = tqdm(total=total, desc="pretrain θ0", disable=not progress, leave=False)
    try:
        for epoch in range(1, cfg.epochs + 1):
            images, sources = proxy_crops(cfg.n_images, size, cfg.seed, epoch, workers=cfg.workers)
            order = torch.randperm(cfg.n_images, generator=generator)
            sums: dict[str, float] = {}
            count = 0
            for start in range(0, cfg.n_images, cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                x, src = images[idx], sources[idx]
                rot = torch.randint(0, 4, (len(idx),), generator=generator)
                if heads.rotation is not None:
                    x = torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(x, rot)])
                x = x.to(device)
                if heads.operation is not None:
                    x, operation, edit = manipulate(x, generator, cfg.local_p)
                    edited = patchify(edit, patch).mean(2)  # [B, tokens]: edited share of each patch
                target = patchify((x - mean) / std, patch)
                if heads.masked is not None:
                    x, mask = mask_patches(x, patch, cfg.mask_ratio, generator)
                x = (x - mean) / std
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(step, total, cfg.lr, cfg.warmup)
                pooled, tokens = tower(x)
                losses = {}
                if heads.rotation is not None:
                    losses["rotation"] = F.cross_entropy(heads.rotation(pooled), rot.to(device))
                if heads.masked is not None:
                    pred = heads.masked(tokens)
                    m = mask.to(device)
                    losses["masked"] = F.l1_loss(pred[m], target[m])
                if heads.source is not None:
                    losses["source"] = F.cross_entropy(heads.source(pooled), src.to(device))
                if heads.operation is not None:
                    losses["operation"] = F.cross_entropy(heads.operation(pooled), operation)
                    losses["edited"] = F.binary_cross_entropy_with_logits(heads.edited(tokens).squeeze(-1), edited)
                loss = sum(losses.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(tower.parameters()) + list(heads.parameters()), 1.0)
                optimizer.step()
                step += 1
                count += len(idx)
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.item() * len(idx)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            row = {"epoch": epoch, **{k: v / count for k, v in sums.items()}}
            row["loss"] = sum(v for k, v in row.items() if k != "epoch")
            history.append(row)
    finally:
        bar.close()
        tower.output_tokens = was_output_tokens
    tower.eval()
    tensors = {BACKBONE_PREFIX + k: v.detach().cpu().contiguous() for k, v in tower.state_dict().items()}
    return PretrainResult(tensors, history, time.perf_counter() - started)


def pretrain_backbone(params: Params, progress: bool = True) -> dict[str, torch.Tensor]:
    """θ0's backbone tensors (`backbone.<open_clip key>`) after proxy pretraining."""
    return run_pretraining(params, progress).tensors
