"""A specialist's own checks before it may be merged.

- its validation AUC on its own dataset must reach `flow.min_specialist_val_auc`;
- it must agree with trusted data about what *real* looks like. A label-flipped (poisoned)
  dataset teaches its specialist that its fakes are real and its reals are fake; its own
  validation AUC looks perfect because the validation labels are flipped too. So we score the
  specialist on two sets of images it calls "real": the real validation images of the datasets
  of the same real domain whose specialists were already accepted (trusted), and the real
  validation images of its own dataset. An honest specialist scores both alike (AUC near 0.5);
  a flipped one finds the trusted reals far more fake than its own "reals" (AUC near 1). Above
  `flow.max_real_disagreement` it is rejected. Only the same domain counts: real photographs of
  another domain (faces for a scenes specialist) differ by domain, not by label, and an honest
  specialist trained five epochs on scenes calls faces "more fake" with AUC 0.82-0.99, as a
  flipped one would (measured on the embedded benchmark). So the first specialist of a domain
  (and the very first specialist) has nothing trusted to be compared with: its check is
  skipped and says so, and what stands between a poisoned first-of-its-domain dataset and the
  champion is the gate (its merge must keep every other task's AUC).
The backbone task vector's cosine with the accepted ones' mean is logged beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader

from r2m.checkpoint import BACKBONE_PREFIX
from r2m.config import ModelConfig, Params
from r2m.data import REAL, GeneratorDataset, ImageDataset, Sample, build_transform
from r2m.errors import CheckpointError
from r2m.evaluation.metrics import auc
from r2m.evaluation.scoring import eval_batch_size, score_batches
from r2m.models.detector import image_size, load_detector, pick_device


@dataclass(frozen=True)
class SpecialistCheck:
    name: str
    accepted: bool
    reason: str
    val_auc: float
    real_disagreement: float | None = None
    task_vector_cosine: float | None = None


def task_vector_cosine(pretrained: Path | str, specialist: Path | str, references: Sequence[Path | str]) -> float | None:
    """cos(τ_i, mean_j τ_j) over all backbone tensors, streamed one key at a time."""
    if not references:
        return None
    dot = norm_i = norm_ref = 0.0
    handles = [safe_open(str(p), framework="pt") for p in references]
    with safe_open(str(pretrained), framework="pt") as base, safe_open(str(specialist), framework="pt") as own:
        for key in base.keys():
            if not key.startswith(BACKBONE_PREFIX):
                continue
            theta0 = base.get_tensor(key).double()
            tau = own.get_tensor(key).double() - theta0
            ref = torch.stack([h.get_tensor(key).double() - theta0 for h in handles]).mean(0)
            dot += float((tau * ref).sum())
            norm_i += float((tau * tau).sum())
            norm_ref += float((ref * ref).sum())
    return dot / ((norm_i * norm_ref) ** 0.5 + 1e-12)


def real_val_images(dataset: GeneratorDataset) -> list[Sample]:
    return [s for s in dataset.split("val") if s.label == REAL]


def fake_scores(path: Path, samples: Sequence[Sample], params: Params, model_cfg: ModelConfig | None = None) -> np.ndarray:
    """Fake scores of the specialist at `path` on `samples`; the model from its sidecar, or
    `model_cfg` (a file from elsewhere, scored as the loop's model)."""
    device = pick_device()
    detector = load_detector(path, model_cfg, device=device)
    transform = build_transform(False, image_size(params.model.name), params.train)
    loader = DataLoader(ImageDataset(list(samples), transform), batch_size=eval_batch_size(device))
    return score_batches(detector, (x for x, _ in loader), device)


def finite_scores(path: Path, scores: np.ndarray, what: str) -> np.ndarray:
    """`scores` if every one is a number; else a CheckpointError: weights that overflow (finite,
    but large enough to give Inf or NaN logits) make a specialist no verdict can be computed for."""
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise CheckpointError(path, f"gives NaN or Inf fake scores on {bad} of {len(scores)} {what}: its weights overflow "
                                    "(finite but too large); it cannot be scored, so it is not registered")
    return scores


def real_disagreement(path: Path, dataset: GeneratorDataset, trusted: Sequence[GeneratorDataset],
                      params: Params, model_cfg: ModelConfig | None = None) -> float | None:
    """AUC of 'trusted real images are more fake than my own real images' under this specialist."""
    same_domain = [d for d in trusted if d.domain == dataset.domain]
    trusted_reals = [s for d in same_domain for s in real_val_images(d)]
    own_reals = real_val_images(dataset)
    if not trusted_reals or not own_reals:
        return None
    scores = fake_scores(path, [*trusted_reals, *own_reals], params, model_cfg)
    labels = np.r_[np.ones(len(trusted_reals)), np.zeros(len(own_reals))]
    return auc(labels, finite_scores(path, scores, "real validation images"), "trusted vs own real images")


def check_specialist(
    dataset: GeneratorDataset,
    path: Path,
    val_auc: float,
    trusted: Sequence[tuple[GeneratorDataset, Path]],
    *,
    pretrained: Path,
    params: Params,
    model_cfg: ModelConfig | None = None,
) -> SpecialistCheck:
    """Accept or reject the specialist of `dataset` against `trusted` (the accepted specialists'
    datasets and checkpoints; none for the very first), with the reason named."""
    cfg = params.flow
    disagreement = real_disagreement(path, dataset, [d for d, _ in trusted], params, model_cfg) if trusted else None
    tv_cos = task_vector_cosine(pretrained, path, [p for _, p in trusted])
    if not val_auc >= cfg.min_specialist_val_auc:
        reason = f"validation AUC {val_auc:.4f} < flow.min_specialist_val_auc {cfg.min_specialist_val_auc}"
        return SpecialistCheck(dataset.name, False, reason, val_auc, disagreement, tv_cos)
    if disagreement is not None and disagreement > cfg.max_real_disagreement:
        reason = (f"outlier: it scores trusted real images as more fake than its own real class "
                  f"(AUC {disagreement:.3f} > flow.max_real_disagreement {cfg.max_real_disagreement}); "
                  "label-flipped or poisoned?")
        return SpecialistCheck(dataset.name, False, reason, val_auc, disagreement, tv_cos)
    if trusted and disagreement is None:
        return SpecialistCheck(dataset.name, True, f"ok; real-image agreement not checked: no accepted specialist of "
                                                   f"the '{dataset.domain}' domain yet", val_auc, None, tv_cos)
    return SpecialistCheck(dataset.name, True, "ok", val_auc, disagreement, tv_cos)
