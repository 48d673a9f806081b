"""A specialist's own checks before it may be merged.

- its validation AUC on its own dataset must reach `flow.min_specialist_val_auc`;
- its "fake direction" must agree with the other specialists'. Every specialist shares θ0 and
  the head's seeded initialisation, so honest specialists move the head's fake-minus-real row
  w = W[1] − W[0] the same broad way; a label-flipped (poisoned) specialist moves it the
  opposite way. We compare the change of w_i with the mean change of the specialists already
  accepted by cosine; below `flow.outlier_cosine` it is an outlier. The backbone task
  vector's cosine is reported beside it. (The very first specialist has nothing to be
  compared with and sets the reference.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from r2m.checkpoint import BACKBONE_PREFIX


@dataclass(frozen=True)
class SpecialistCheck:
    name: str
    accepted: bool
    reason: str
    val_auc: float
    head_cosine: float | None = None
    task_vector_cosine: float | None = None


def fake_direction(path: Path | str, initial: torch.nn.Linear) -> torch.Tensor:
    """What training added to the head's fake-minus-real row: (W[1] − W[0]) − (W⁰[1] − W⁰[0])."""
    with safe_open(str(path), framework="pt") as f:
        weight = f.get_tensor("head.weight").double()
    start = initial.weight.detach().double()
    return (weight[1] - weight[0]) - (start[1] - start[0])


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


def check_specialist(
    name: str,
    path: Path,
    val_auc: float,
    references: Sequence[Path],
    *,
    pretrained: Path,
    initial: torch.nn.Linear,
    min_val_auc: float,
    outlier_cosine: float,
) -> SpecialistCheck:
    """Accept or reject one specialist against `references` (the specialists already accepted;
    none for the very first, which sets the direction), with the reason named."""
    head_cos = None
    if references:
        mean = torch.stack([fake_direction(r, initial) for r in references]).mean(0)
        head_cos = float(torch.nn.functional.cosine_similarity(fake_direction(path, initial), mean, dim=0))
    tv_cos = task_vector_cosine(pretrained, path, references)
    if not val_auc >= min_val_auc:
        return SpecialistCheck(name, False, f"validation AUC {val_auc:.4f} < flow.min_specialist_val_auc {min_val_auc}",
                               val_auc, head_cos, tv_cos)
    if head_cos is not None and head_cos < outlier_cosine:
        reason = (f"outlier: its fake direction has cosine {head_cos:.3f} with the accepted specialists' "
                  f"(< flow.outlier_cosine {outlier_cosine}); label-flipped or poisoned?")
        return SpecialistCheck(name, False, reason, val_auc, head_cos, tv_cos)
    return SpecialistCheck(name, True, "ok", val_auc, head_cos, tv_cos)
