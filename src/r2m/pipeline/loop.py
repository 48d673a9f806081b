"""The continual loop once: scan → onboard each new generator → re-merge → gate → release.

Onboarding is one generator at a time (docs/architecture.md, "The continual loop"): each accepted specialist is followed by
a re-merge of every specialist accepted so far, gated against the champion of that moment and
released if it passes. A backlog (the first run, or several datasets dropped at once) is thus
onboarded as the same sequence of candidates that arriving one by one would give: every step
leaves a registered candidate, the champion is the last one that passed, and each failed step is
a failed challenger with its reason. The intermediate steps merge and score R²M alone; the last
one (over every accepted specialist) also scores the baselines and All-in-one.

Crash-safe: the steps still owed are derived from the registry (accepted specialists registered
after the newest settled candidate, i.e. one that failed the gate or was released), so a rerun
after a kill redoes exactly the missing steps, in order, and finishes a release a kill cut short.
What a kill -9 leaves in the folders the loop owns (`….tmp` files of unfinished atomic writes,
a checkpoint without its sidecar) is removed first (`clean_leftovers`), and every run ends by
making the repository serve `champion` (`serve_champion`).

One definition of the sequence: `run_steps` takes the steps as callables (`LoopSteps`);
`run_once` (`r2m run`) passes the plain functions (`plain_steps`), `flows/continual.py` Prefect
tasks around the same functions (and, with a work pool, an `onboard` that waits for the pool's
training run), so the flows cannot take other steps than `r2m run`.

One run at a time per project: `run_once` holds the project lock (`r2m.pipeline.lock`) from
before the scan to the end, as the Prefect flows do.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from r2m.checkpoint import file_sha256, sidecar_path
from r2m.config import Params
from r2m.data import GeneratorDataset
from r2m.merging.registry import plan
from r2m.models import ensure_pretrained
from r2m.pipeline.candidate import Candidate, remerge
from r2m.pipeline.external import has_external
from r2m.pipeline.lock import project_lock
from r2m.pipeline.promotion import PUBLISHED_TAG, Release, release, serve_champion
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
    candidate: Candidate | None = None  # the final step: over every accepted specialist
    steps: list[Candidate] = field(default_factory=list)  # intermediate candidates of a backlog, in order
    release: Release | None = None  # the last release of this run
    champion: str | None = None

    def lines(self) -> list[str]:
        out = [f"datasets: {self.scan.summary()}"]
        out += [f"rejected dataset {r.path.name}: {r.reason}" for r in self.scan.rejected]
        for s in self.onboarded:
            out.append(f"specialist {s.generator} v{s.version}: {s.status} (val AUC {s.val_auc:.4f})"
                       + ("" if s.status == ACCEPTED else f" — {s.reason}"))
        for c in self.steps:
            out.append(f"step r2m-detector v{c.version} ({c.method} {c.hparams})"
                       + (" [unchanged since last run]" if c.reused else "") + f": {c.gate_reason}")
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
    """`scan`'s question: does this dataset's content already have a specialist with a verdict
    (or an accepted one registered from outside, `r2m.pipeline.external`)?"""
    theta0 = file_sha256(pretrained)
    return lambda dataset: is_onboarded(client, dataset, params, theta0) or has_external(client, dataset, theta0)


def is_released(client, candidate: Candidate) -> bool:
    """A candidate found again whose release completed before: nothing to redo (and a rollback
    since then is respected, not undone)."""
    return candidate.reused and PUBLISHED_TAG in registry.get_version(client, candidate.version).tags


def settled_since(client) -> int | None:
    """When the newest *settled* candidate was registered (ms): one that failed the gate or was
    released. A candidate that passed but whose release did not finish is not settled."""
    try:
        found = client.search_model_versions(f"name='{registry.DETECTOR}'")
    except Exception:
        return None
    settled = [int(mv.creation_timestamp or 0) for mv in found
               if mv.tags.get("gate") == "failed" or PUBLISHED_TAG in mv.tags]
    return max(settled, default=None)


def pending_steps(client, accepted: list[Specialist]) -> list[list[Specialist]]:
    """The steps still owed, in onboarding order: for each accepted specialist registered after
    the newest settled candidate, the specialists accepted up to it."""
    since = settled_since(client)
    history = sorted(accepted, key=lambda s: (s.registered_at, s.generator))
    owed = [s for s in history if since is None or s.registered_at > since]
    return [[a for a in history if a.registered_at <= s.registered_at] for s in owed]


# the folders only the loop writes (under the project lock), and where a kill leaves debris
OWNED_FOLDERS = ("specialists", "candidates", "all-in-one", "onnx", "scores", "cache")


def clean_leftovers(params: Params) -> list[Path]:
    """Remove what a killed run left in the loop's folders under `artifacts/`: temp files of
    atomic writes (`….tmp`), unfinished downloads, and checkpoints without their
    sidecar (the sidecar is written last, so such a file is unfinished). Call it holding the
    project lock. Returns what was removed."""
    import shutil

    removed: list[Path] = []
    artifacts = params.path("artifacts")
    for name in OWNED_FOLDERS:
        folder = artifacts / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.is_dir() and path.name.startswith(".download-"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            elif path.is_file() and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                removed.append(path)
            elif path.is_file() and path.suffix == ".safetensors" and not sidecar_path(path).is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    for path in removed:
        log.warning("removed %s left by an interrupted run", path)
    return removed


@dataclass(frozen=True)
class LoopSteps:
    """The loop's steps as callables: the one sequence, `run_steps`, calls nothing else.

    `plain_steps` binds them to the functions of `r2m.pipeline` (`r2m run`); `flows/continual.py`
    passes Prefect tasks around the same functions, and with `flow.work_pool` set an `onboard`
    that waits for a training run on the pool (`start_training` hands the whole backlog to the
    pool first, so it trains in parallel while the steps below stay one at a time, in order).
    """

    accepted: Callable[[Sequence[str]], list[Specialist]]  # newest accepted specialist per generator
    onboard: Callable[[GeneratorDataset, Sequence[Specialist], Sequence[GeneratorDataset]],
                      tuple[Specialist, SpecialistCheck | None]]  # train (or wait), check, register
    all_in_one: Callable[[Sequence[GeneratorDataset]], Path]
    remerge: Callable[[Sequence[Specialist], Scan, Path | None, bool], Candidate | None]  # + gate
    release: Callable[[Candidate, Sequence[GeneratorDataset], Sequence[Specialist]], Release]
    champion: Callable[[], str | None]
    start_training: Callable[[Sequence[GeneratorDataset]], None] = lambda datasets: None  # in-process: nothing


def plain_steps(params: Params, client, pretrained: Path, *, progress: bool = True) -> LoopSteps:
    """The steps as plain calls into `r2m.pipeline` (no Prefect): what `r2m run` takes."""
    return LoopSteps(
        accepted=lambda generators: registered_specialists(params, generators, client),
        onboard=lambda dataset, accepted, seen: onboard_specialist(
            dataset, params, pretrained=pretrained, accepted=accepted, datasets=seen, progress=progress,
            client=client),
        all_in_one=lambda datasets: ensure_all_in_one(datasets, params, pretrained, progress=progress),
        remerge=lambda specialists, found, all_in_one, final: remerge(
            params, client, pretrained, specialists, found.seen, found.unseen, all_in_one=all_in_one,
            baselines=final, progress=progress),
        release=lambda candidate, seen, specialists: release(
            params, client, candidate.version, candidate.path, candidate.sha256, seen,
            lineage=lineage_of(specialists)),
        champion=lambda: registry.alias_version(client, registry.CHAMPION),
    )


def lineage_of(specialists: Sequence[Specialist]) -> dict:
    return {"specialists": {s.generator: s.version for s in specialists}}


def run_steps(params: Params, client, found: Scan, datasets: Sequence[GeneratorDataset],
              steps: LoopSteps) -> LoopReport:
    """The loop's one sequence, after the scan: onboard `datasets` one by one, each accepted
    specialist followed by a re-merge of all accepted so far, gate and release; the last step
    (over every accepted specialist) also scores the baselines and All-in-one. Steps a crash
    left undone (`pending_steps`) come first, in order; the run ends by making the repository
    serve `champion`. Call it holding the project lock. Only `steps` act; `client` reads the
registry (owed steps, finished releases) and makes the repository serve the champion."""
    plan(params.merge)  # a bad merge section is a ConfigError now, not after the trainings
    report = LoopReport(scan=found)
    seen_names = [d.name for d in found.seen]

    def step(specialists: list[Specialist], final: bool) -> Candidate | None:
        """Re-merge `specialists`, gate, and release the candidate if it passed."""
        merged_data = [d for d in found.seen if d.name in {s.generator for s in specialists}]
        all_in_one = None
        if final and params.flow.all_in_one and specialists:
            all_in_one = steps.all_in_one(merged_data)
        candidate = steps.remerge(specialists, found, all_in_one, final)
        if candidate is not None and candidate.gate_passed and not is_released(client, candidate):
            report.release = steps.release(candidate, merged_data, specialists)
        if candidate is not None and not final:
            report.steps.append(candidate)
        return candidate

    if datasets:  # a work pool starts training the whole backlog now, in parallel; in-process: nothing
        steps.start_training(datasets)
    accepted = steps.accepted(seen_names)
    for specialists in pending_steps(client, accepted):  # steps a crash left undone
        if len(specialists) < len(accepted) or datasets:  # else: the final step below
            step(specialists, final=False)
    for i, dataset in enumerate(datasets):
        specialist, check = steps.onboard(dataset, accepted, found.seen)
        report.onboarded.append(specialist)
        if check is not None:
            report.checks.append(check)
        accepted = steps.accepted(seen_names)
        if specialist.status == ACCEPTED and i < len(datasets) - 1:
            step(accepted, final=False)
    report.specialists = accepted
    report.candidate = step(accepted, final=True)
    serve_champion(params, client)  # also after a rollback, or a kill between promote and publish
    report.champion = steps.champion()
    return report


def run_once(params: Params, *, progress: bool = True, wait: bool = True, on_wait=None) -> LoopReport:
    """The loop once, without Prefect (`r2m run`): `run_steps` with `plain_steps`.

    Holds the project lock throughout: another run in progress is waited for (`wait`, telling
    `on_wait`), or refused with `LoopBusy`."""
    with project_lock(params, wait=wait, on_wait=on_wait):
        clean_leftovers(params)
        client = mlflow_store.client(params)
        pretrained = ensure_pretrained(params, progress=progress)
        found = scan(params, onboarded_check(params, client, pretrained))
        return run_steps(params, client, found, found.to_onboard,
                         plain_steps(params, client, pretrained, progress=progress))
