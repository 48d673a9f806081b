"""Step 1 of the loop: find the generator datasets under the data root and sort them out.

A dataset counts once its `generator.yaml` is present; it is then validated whole. A dataset
that fails validation is moved to quarantine with its reason (nothing of it is ingested);
seen datasets whose content hash has no specialist yet are to be onboarded; unseen datasets
join the evaluation suite (paper Protocol 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from r2m.config import Params
from r2m.data import GeneratorDataset, quarantine, validate_data_root


@dataclass(frozen=True)
class Rejection:
    path: Path
    reason: str
    quarantined_to: Path | None = None


@dataclass
class Scan:
    seen: list[GeneratorDataset] = field(default_factory=list)
    unseen: list[GeneratorDataset] = field(default_factory=list)
    to_onboard: list[GeneratorDataset] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.seen)} seen, {len(self.unseen)} unseen, {len(self.to_onboard)} new to onboard, "
            f"{len(self.rejected)} rejected"
        )


def scan(params: Params, is_onboarded: Callable[[GeneratorDataset], bool], *, quarantine_rejected: bool = True) -> Scan:
    """Validate every dataset under the data root; `is_onboarded` says whether a seen dataset's
    content (by data hash) already has a specialist in the registry."""
    data_root = params.path("data_root")
    result = Scan()
    if not data_root.is_dir():
        return result
    for folder, outcome in validate_data_root(data_root, params.data):
        if isinstance(outcome, Exception):
            moved = quarantine(folder, data_root, str(outcome)) if quarantine_rejected else None
            result.rejected.append(Rejection(folder, str(outcome), moved))
        elif outcome.role == "seen":
            result.seen.append(outcome)
            if not is_onboarded(outcome):
                result.to_onboard.append(outcome)
        else:
            result.unseen.append(outcome)
    return result
