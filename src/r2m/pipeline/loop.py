"""The continual loop once: scan → onboard each new generator → re-merge → gate → release."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from r2m.checkpoint import file_sha256
from r2m.config import Params
from r2m.models import ensure_pretrained
from r2m.pipeline.candidate import Candidate, remerge
from r2m.pipeline.promotion import PUBLISHED_TAG, Release, release
from r2m.pipeline.safety import SpecialistCheck
from r2m.pipeline.scan import Scan, scan
from r2m.pipeline.specialists import ACCEPTED, Specialist, is_onboarded, onboard_specialist, registered_specialists
from r2m.tracking import mlflow_store, registry

log = logging.getLogger("r2m.loop")


@dataclass
class LoopReport:
    scan: Scan
    onboarded: list[Specialist] = field(default_factory=list)
    checks: list[SpecialistCheck] = field(default_factory=list)
    specialists: list[Specialist] = field(default_factory=list)
    candidate: Candidate | None = None
    release: Release | None = None
    champion: str | None = None

    def lines(self) -> list[str]:
        out = [f"datasets: {self.scan.summary()}"]
        out += [f"rejected dataset {r.path.name}: {r.reason}" for r in self.scan.rejected]
        for s in self.onboarded:
            out.append(f"specialist {s.generator} v{s.version}: {s.status} (val AUC {s.val_auc:.4f})"
                       + ("" if s.status == ACCEPTED else f" — {s.reason}"))
        if self.candidate is None:
            out.append("no candidate: no accepted specialist yet")
        else:
            c = self.candidate
            out.append(f"candidate r2m-detector v{c.version} ({c.method} {c.hparams})"
                       + (" [unchanged since last run]" if c.reused else "") + f": {c.gate_reason}")
        if self.release is not None:
            r = self.release
            out.append(f"released v{r.version}: champion, published {r.published}")
        out.append(f"champion: r2m-detector v{self.champion}" if self.champion else "champion: none")
        return out


def ensure_all_in_one(datasets, params: Params, pretrained: Path, *, progress: bool = True) -> Path:
    """The All-in-one baseline for exactly these datasets, θ0 and recipe (trained once, then reused)."""
    from r2m.checkpoint import read_meta
    from r2m.training.all_in_one import train_all_in_one
    from r2m.training.specialist import recipe

    key = hashlib.sha256(json.dumps({
        "data": sorted((d.name, d.data_hash) for d in datasets),
        "theta0": file_sha256(pretrained),
        "recipe": recipe(params),
    }, sort_keys=True).encode()).hexdigest()
    path = params.path("artifacts") / "all-in-one" / f"all-in-one-{key[:16]}.safetensors"
    if not (path.is_file() and read_meta(path).get("sha256") == file_sha256(path)):
        train_all_in_one(datasets, params, path, pretrained=pretrained, progress=progress)
    return path


def onboarded_check(params: Params, client, pretrained: Path):
    """`scan`'s question: does this dataset's content already have a specialist with a verdict?"""
    theta0 = file_sha256(pretrained)
    return lambda dataset: is_onboarded(client, dataset, params, theta0)


def is_released(client, candidate: Candidate) -> bool:
    """A candidate found again whose release completed before: nothing to redo (and a rollback
    since then is respected, not undone)."""
    return candidate.reused and PUBLISHED_TAG in registry.get_version(client, candidate.version).tags


def run_once(params: Params, *, progress: bool = True) -> LoopReport:
    """The loop once, without Prefect (`r2m run`); `flows/continual.py` takes the same steps as tasks."""
    client = mlflow_store.client(params)
    pretrained = ensure_pretrained(params, progress=progress)
    found = scan(params, onboarded_check(params, client, pretrained))
    report = LoopReport(scan=found)
    seen_names = [d.name for d in found.seen]
    accepted = registered_specialists(params, seen_names, client)
    for dataset in found.to_onboard:
        specialist, check = onboard_specialist(dataset, params, pretrained=pretrained, accepted=accepted,
                                               datasets=found.seen, progress=progress, client=client)
        report.onboarded.append(specialist)
        if check is not None:
            report.checks.append(check)
        accepted = registered_specialists(params, seen_names, client)
    report.specialists = accepted

    all_in_one = None
    if params.flow.all_in_one and accepted:
        all_in_one = ensure_all_in_one([d for d in found.seen if d.name in {s.generator for s in accepted}],
                                       params, pretrained, progress=progress)
    candidate = remerge(params, client, pretrained, accepted, found.seen, found.unseen,
                        all_in_one=all_in_one, progress=progress)
    report.candidate = candidate
    if candidate is not None and candidate.gate_passed and not is_released(client, candidate):
        seen = [d for d in found.seen if d.name in {s.generator for s in accepted}]
        report.release = release(params, client, candidate.version, candidate.path, candidate.sha256, seen,
                                 lineage={"specialists": {s.generator: s.version for s in accepted}})
    report.champion = registry.alias_version(client, registry.CHAMPION)
    return report
