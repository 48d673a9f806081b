"""Fine-tune one specialist θ_i from θ0 on one generator's dataset (DF40 `clip.yaml` recipe).

Seeded and deterministic on CPU; CUDA with mixed precision when present. The weights kept are
those of the epoch `train.keep` names (the last, or the best validation AUC); with
`train.soup` > 1 the specialist is the mean of that many fine-tunes from the same start, each
with its own data order and augmentations (a uniform model soup). The same function trains the
All-in-one baseline when given several datasets (their union).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from sklearn.metrics import log_loss
from torch.utils.data import ConcatDataset, DataLoader
from tqdm.auto import tqdm

from r2m.checkpoint import file_sha256, load_checkpoint, read_meta, save_checkpoint
from r2m.config import Params
from r2m.data import GeneratorDataset, ImageDataset, build_transform
from r2m.errors import TrainingError
from r2m.evaluation.metrics import auc
from r2m.models.detector import Detector, build_detector, image_size, pick_device
from r2m.threads import configure_torch


@dataclass
class TrainResult:
    path: Path
    sha256: str
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def predict_scores(detector: Detector, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Fake probabilities softmax(logits)[:, 1] and labels over a loader."""
    detector.eval()
    scores, labels = [], []
    for images, targets in loader:
        logits = detector(images.to(device, non_blocking=True)).float()
        scores.append(torch.softmax(logits, dim=1)[:, 1].cpu())
        labels.append(targets)
    return torch.cat(scores).numpy(), torch.cat(labels).numpy()


def freeze_norm_statistics(module: torch.nn.Module) -> None:
    """BatchNorm layers to eval mode: their affine weights still train, their running statistics
    stay θ0's (no effect on LayerNorm-only ViTs)."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Validation AUC (r2m.evaluation.metrics.auc); NaN when the split lacks a class."""
    return auc(labels, scores, "validation") if len(set(labels.tolist())) == 2 else float("nan")


def _val_loss(labels: np.ndarray, scores: np.ndarray) -> float:
    """Validation cross-entropy of the fake probabilities (sklearn's log loss)."""
    return float(log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7), labels=[0, 1])) if labels.size else float("nan")


def _improves(row: dict, best: dict | None) -> bool:
    """Keep an epoch when its validation AUC beats every earlier one; of equal AUCs, the lower
    validation loss (an AUC saturated at 1.0 no longer tells epochs apart, the loss still does:
    it prefers the specialist whose margins survive merging); of equal both, the earliest. A NaN
    AUC never beats one."""
    if best is None:
        return True
    auc, best_auc = row["val_auc"], best["val_auc"]
    if math.isnan(best_auc):
        return not math.isnan(auc)
    if math.isnan(auc) or auc < best_auc:
        return False
    return auc > best_auc or row["val_loss"] < best["val_loss"]


def member_seeds(seed: int, soup: int) -> list[int]:
    """The training seeds of a soup's members: `seed` itself, then seeds derived from (seed, i)
    by numpy's SeedSequence, so the members of seed 1 and seed 2 never coincide."""
    return [seed] + [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(1, soup)]


def _weights(detector: Detector) -> dict[str, torch.Tensor]:
    """A CPU copy of the detector's checkpoint tensors (the weights kept of an epoch)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in detector.checkpoint_tensors().items()}


def _fine_tune(detector: Detector, train_loader: DataLoader, val_loader: DataLoader, params: Params,
               device: torch.device, name: str, progress: bool, on_epoch) -> tuple:
    """One fine-tuning run of `detector` (already at its starting weights): `train.epochs` epochs of
    Adam, validated after each. Returns the kept epoch's row and weights (`train.keep`), every
    epoch's row, the images seen and the seconds spent training."""
    cfg = params.train
    optimizer = torch.optim.Adam(
        [
            {"params": detector.backbone.parameters(), "lr": params.backbone_lr},
            {"params": detector.head.parameters(), "lr": params.head_lr},
        ],
        betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
    )
    amp = device.type == "cuda" and cfg.mixed_precision
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)
    loss_fn = torch.nn.CrossEntropyLoss()
    history: list[dict] = []
    best: tuple[dict, dict[str, torch.Tensor]] | None = None  # (epoch row, weights) of the epoch kept
    seen_images, train_seconds = 0, 0.0
    for epoch in range(1, cfg.epochs + 1):
        detector.train()
        if cfg.freeze_norm_stats:
            freeze_norm_statistics(detector)
        total, count = 0.0, 0
        t0 = time.perf_counter()
        bar = tqdm(train_loader, desc=f"{name} epoch {epoch}/{cfg.epochs}", disable=not progress, leave=False)
        for images, labels in bar:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                loss = loss_fn(detector(images), labels)
            if not math.isfinite(loss.item()):
                raise TrainingError(f"specialist '{name}': loss became {loss.item()} at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.item() * len(labels)
            count += len(labels)
            bar.set_postfix(loss=f"{total / count:.4f}")
        train_seconds += time.perf_counter() - t0
        seen_images += count
        scores, targets = predict_scores(detector, val_loader, device)
        row = {"epoch": epoch, "train_loss": total / max(count, 1), "val_auc": _auc(targets, scores),
               "val_loss": _val_loss(targets, scores)}
        history.append(row)
        if cfg.keep == "best" and _improves(row, best[0] if best else None):
            best = (row, _weights(detector))
        if on_epoch:
            on_epoch(row)
        if progress:
            tqdm.write(f"{name} epoch {epoch}: train loss {row['train_loss']:.4f}  val AUC {row['val_auc']:.4f}")
    kept, tensors = best if cfg.keep == "best" else (history[-1], _weights(detector))  # last: copied once
    return kept, tensors, history, seen_images, train_seconds


def _loader(datasets: Sequence[GeneratorDataset], split: str, transform, params: Params, shuffle: bool, generator=None) -> DataLoader:
    parts = [ImageDataset(ds.split(split), transform) for ds in datasets]
    return DataLoader(
        ConcatDataset(parts),
        batch_size=params.train.batch_size,
        shuffle=shuffle,
        num_workers=params.train.num_workers,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
    )


def recipe(params: Params) -> dict:
    """Everything that determines a specialist besides its data and θ0."""
    return {
        "model": params.model.name,
        "backbone_lr": params.backbone_lr,
        "head_lr": params.head_lr,
        **params.train.model_dump(mode="json"),
    }


def train_specialist(
    datasets: Sequence[GeneratorDataset],
    params: Params,
    out: Path | str,
    *,
    pretrained: Path | str,
    name: str | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Fine-tune θ0 (`pretrained`) on the train splits of `datasets`; validate on their val splits
    after every epoch and save the weights `train.keep` names: the epoch with the best validation
    AUC, ties broken by the lower validation loss (`best`), or the last epoch (`last`). Never test
    data: `metrics.best_epoch` names the epoch saved, `history` has every epoch."""
    if not datasets:
        raise TrainingError("no dataset to train on")
    unseen = [ds.name for ds in datasets if ds.role != "seen"]
    if unseen:
        raise TrainingError(f"dataset '{unseen[0]}' has role unseen: it is for evaluation only")
    name = name or "+".join(ds.name for ds in datasets)
    out = Path(out)
    cfg = params.train
    device = pick_device()
    configure_torch()  # threads that fit the box (r2m.threads; docs/usage.md, "Running beside other jobs")
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)

    theta0 = load_checkpoint(pretrained)
    theta0_sha = file_sha256(pretrained)
    # train.seed decides the head's initialisation (θ0 has none), shared by every member of a soup,
    # then member 0's data order and augmentations, continuing the same stream (as one fine-tune)
    generator = seed_everything(cfg.seed)
    detector = build_detector(params.model)
    detector.load_checkpoint_tensors(theta0.tensors, source=pretrained)
    start = {k: v.detach().clone() for k, v in detector.checkpoint_tensors().items()} if cfg.soup > 1 else None
    size = image_size(params.model.name)
    val_loader = _loader(datasets, "val", build_transform(False, size, cfg), params, False)

    history: list[dict] = []
    started = time.perf_counter()
    seen_images, train_seconds, train_images = 0, 0.0, 0
    kept_rows, soup = [], None  # each member's kept epoch; the running sum of their weights
    for member, seed in enumerate(member_seeds(cfg.seed, cfg.soup)):
        if member:  # back to the shared start, on the member's own seed
            generator = seed_everything(seed)
            detector.load_checkpoint_tensors(start, source=pretrained)
        detector.to(device)
        train_loader = _loader(datasets, "train", build_transform(True, size, cfg), params, True, generator)
        train_images = len(train_loader.dataset)
        label = name if cfg.soup == 1 else f"{name} [{member + 1}/{cfg.soup}]"
        kept, tensors, rows, images, seconds = _fine_tune(detector, train_loader, val_loader, params, device,
                                                          label, progress, on_epoch)
        seen_images += images
        train_seconds += seconds
        for row in rows:
            history.append(row | ({"member": member, "step": member * cfg.epochs + row["epoch"]} if cfg.soup > 1 else {}))
        kept_rows.append(kept)
        if soup is None:
            soup = tensors
        else:
            for k, v in tensors.items():
                if v.is_floating_point():
                    soup[k] += v
    kept = kept_rows[0]
    if cfg.soup == 1:
        tensors = soup
        val_auc, val_loss = kept["val_auc"], kept["val_loss"]
    else:  # the uniform soup: the mean of the members' weights (integer buffers: the first member's)
        tensors = {k: v / cfg.soup if v.is_floating_point() else v for k, v in soup.items()}
        detector.load_checkpoint_tensors(tensors, source=out)
        scores, targets = predict_scores(detector, val_loader, device)
        val_auc, val_loss = _auc(targets, scores), _val_loss(targets, scores)

    metrics = {
        "val_auc": val_auc,
        "val_loss": val_loss,
        "train_loss": float(np.mean([r["train_loss"] for r in kept_rows])),
        "best_epoch": kept["epoch"],  # the epoch whose weights are saved (the first member's, in a soup)
        "last_val_auc": history[-1]["val_auc"],
        "train_seconds": time.perf_counter() - started,
        "images_per_s": seen_images / train_seconds if train_seconds else float("nan"),
        "train_images": train_images,
        "val_images": len(val_loader.dataset),
    }
    if cfg.soup > 1:
        metrics |= {"soup": cfg.soup, "member_val_auc_mean": float(np.mean([r["val_auc"] for r in kept_rows]))}
    meta = {
        "kind": "specialist" if len(datasets) == 1 else "all-in-one",
        "generator": name,
        "generators": [ds.name for ds in datasets],
        "families": sorted({ds.family for ds in datasets}),
        "domains": sorted({ds.domain for ds in datasets}),
        "data_hash": datasets[0].data_hash if len(datasets) == 1 else {ds.name: ds.data_hash for ds in datasets},
        "theta0_sha256": theta0_sha,
        "model": read_meta(pretrained).get("model", {"name": params.model.name}),
        "recipe": recipe(params),
        "metrics": metrics,
        "history": history,
        "device": device.type,
    }
    sha = save_checkpoint(out, tensors, meta)
    return TrainResult(path=out, sha256=sha, metrics=metrics, history=history)
