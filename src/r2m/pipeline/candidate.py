"""Step 4 of the loop: re-merge all accepted specialists, evaluate, gate, register the candidate.

The candidate is R²M (`merge.method`), its hyperparameters chosen on the seen datasets'
*validation* splits only (never on unseen sets); the baselines (`merge.baselines`) and, when
enabled, the All-in-one model are scored beside it for comparison in the same MLflow run. The
candidate is registered as a version of `r2m-detector` whatever the verdict: a failed one is
tagged `gate=failed` with the reason and never touches `champion`.

Idempotent: a candidate is keyed by its specialists' versions, the merge settings and the gate
settings; when a detector version with that key exists, nothing is merged or registered again.
History is immutable: the version is created with its verdict, lineage, key and artifact URI
in one call and never retagged. A changed gate gives a new key, hence a new evaluation: a new
merge run and a new detector version (the same merged checkpoint, judged again), while the
earlier version keeps the verdict it was given. A kill between the merge run and the version
leaves a finished run with no version; the rerun evaluates again (scores come from the cache).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from r2m.checkpoint import file_sha256, read_meta
from r2m.config import Params
from r2m.data import GeneratorDataset
from r2m.evaluation.judge import judge
from r2m.evaluation.protocol import Roles
from r2m.evaluation.validation import ValidationScorer
from r2m.fileio import atomic_write_json
from r2m.merging import select
from r2m.merging.files import merge_files
from r2m.merging.hierarchy import Grouping, group_key, specialist_groups
from r2m.merging.registry import plan
from r2m.names import specialist_name
from r2m.pipeline.specialists import Specialist
from r2m.tracking import registry, runs
from r2m.tracking.artifacts import ARTIFACT_URI_TAG, checkpoint_uri, resolve_checkpoint

CANDIDATE_KEY = "candidate_key"
CHAMPION_MODEL = "champion"


@dataclass(frozen=True)
class Candidate:
    key: str
    version: str
    method: str
    hparams: dict
    path: Path
    sha256: str
    gate_passed: bool
    gate_reason: str
    run_id: str
    reused: bool = False
    report: dict = field(default_factory=dict)  # the gate report (GateReport.as_dict): what the flow renders


def candidate_key(specialists: Sequence[Specialist], params: Params) -> str:
    doc = {
        "specialists": sorted((s.generator, s.version, s.data_hash) for s in specialists),
        "merge": params.merge.model_dump(mode="json"),
        "gate": params.gate.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def find_candidate(client, tag: str, value: str):
    """The newest detector version with `tag` = `value`, if any."""
    try:
        found = client.search_model_versions(f"name='{registry.DETECTOR}' and tags.`{tag}` = '{value}'")
    except Exception:
        return None
    return max(found, key=lambda mv: int(mv.version)) if found else None


def _from_version(mv, reused: bool, params: Params, client, report: dict | None = None) -> Candidate:
    tags = mv.tags
    if report is None:  # found again: the verdict it was given, as logged with its run
        report = runs.logged_gate_report(client, mv.run_id) if mv.run_id else {}
    return Candidate(
        key=tags.get(CANDIDATE_KEY, ""), version=str(mv.version), method=tags.get("method", ""),
        hparams=json.loads(tags.get("hparams", "{}")), path=resolve_checkpoint(params, client, mv),
        sha256=tags.get("sha256", ""), gate_passed=tags.get("gate") == "passed",
        gate_reason=tags.get("gate_reason", ""), run_id=mv.run_id or "", reused=reused, report=report,
    )


def champion_checkpoint(params: Params, client) -> Path | None:
    """The merged checkpoint of the current champion (resolved from its artifact URI), if any."""
    version = registry.alias_version(client, registry.CHAMPION)
    if version is None:
        return None
    return resolve_checkpoint(params, client, registry.get_version(client, version))


def merge_methods(params: Params, pretrained: Path, paths: Sequence[Path], seen: Sequence[GeneratorDataset],
                  folder: Path, *, baselines: bool = True) -> tuple[dict[str, Path], dict[str, list[dict]]]:
    """`merge.method` then (with `baselines`) every baseline of `merge.baselines`, written to
    `folder/<method>.safetensors`. With `merge.select` each method's grid (params.yaml's for the
    candidate's method, the declared one for the baselines) is scored on the seen validation
    splits and the best point merged into the file (`r2m.merging.select` holds one point in
    memory at a time, so the chosen one is merged once more, streamed); else the candidate's
    method merges at `merge.parameters` and each baseline at its declared defaults. With
    `merge.hierarchy` the candidate's method is the two-level merge (`r2m.merging.hierarchy`).
    Returns the files and, per method, the selection table."""
    merge_plan = plan(params.merge)
    methods = [(merge_plan.method, merge_plan.parameters, merge_plan.grid)]
    if baselines:
        methods += [(spec, spec.resolve({}), spec.declared_grid()) for spec in merge_plan.baselines]
    scorer = None
    merged, selection = {}, {}
    for spec, parameters, grid in methods:
        out = folder / f"{spec.name}.safetensors"
        hierarchy = groups = None
        if spec is merge_plan.method and merge_plan.hierarchy != "none":
            groups, level1 = _hierarchy(params, merge_plan, pretrained, paths, seen, grid, parameters, selection)
            hierarchy = {"grouping": Grouping(groups), "level1": level1, "folder": folder,
                         "cache": _group_cache(params), "identities": [file_sha256(p) for p in paths]}
        # nothing to choose: one specialist (for methods that return it), or at most two groups
        # (level 2 is then the group model or the mean of two, whatever its point)
        trivial = (spec.same_for_one and len(paths) == 1) or (groups is not None and len(groups) <= 2)
        if merge_plan.select and not trivial:
            scorer = scorer or ValidationScorer(params, seen)
            fixed = {k: v for k, v in parameters.items() if k not in grid}
            chosen = select(spec.name, pretrained, paths, scorer, grid=grid, fixed=fixed, hierarchy=hierarchy)
            selection[spec.name] = chosen.table
            parameters = chosen.best_hparams
        if hierarchy is None:
            merge_files(spec.name, pretrained, paths, out, parameters)
        else:
            merge_files(spec.name, pretrained, paths, out, parameters, groups=groups, level1=hierarchy["level1"],
                        group_cache=hierarchy["cache"])
        merged[spec.name] = out
    return merged, selection


def _group_cache(params: Params) -> Path:
    """Where the loop keeps level-1 group models (and their chosen points) across re-merges."""
    return params.path("artifacts") / "candidates" / "groups"


def _hierarchy(params: Params, merge_plan, pretrained: Path, paths: Sequence[Path], seen: Sequence[GeneratorDataset],
               grid: dict, parameters: dict, selection: dict) -> tuple[dict, dict]:
    """The groups, and each group's level-1 point: for a group of three or more, chosen on that
    group's own seen validation splits (kept beside its group model, so an unchanged group is not
    chosen again when a specialist joins another group); else the configured parameters."""
    groups = specialist_groups(merge_plan.hierarchy, paths)
    by_name = {d.name: d for d in seen}
    level1 = {}
    for g, members in groups.items():
        if len(members) < 3:
            continue
        if not merge_plan.select:
            level1[g] = dict(parameters)
            continue
        group_paths = [paths[i] for i in members]
        group_seen = [by_name[read_meta(p).get("generator")] for p in group_paths if read_meta(p).get("generator") in by_name]
        fixed = {k: v for k, v in parameters.items() if k not in grid}
        key = group_key([file_sha256(p) for p in group_paths],
                        {"grid": {k: list(v) for k, v in grid.items()}, "fixed": fixed,
                         "val": sorted(d.data_hash for d in group_seen)})
        record = _group_cache(params) / f"level1-{key}.json"
        if record.is_file():
            level1[g] = json.loads(record.read_text())["hparams"]
            continue
        chosen = select(merge_plan.method.name, pretrained, group_paths, ValidationScorer(params, group_seen),
                        grid=grid, fixed=fixed)
        level1[g] = chosen.best_hparams
        selection[f"{merge_plan.method.name}/level1/{g}"] = chosen.table
        atomic_write_json(record, {"group": g, "hparams": chosen.best_hparams, "table": chosen.table})
    return groups, level1


def remerge(
    params: Params,
    client,
    pretrained: Path,
    specialists: Sequence[Specialist],
    seen: Sequence[GeneratorDataset],
    unseen: Sequence[GeneratorDataset],
    *,
    all_in_one: Path | None = None,
    baselines: bool = True,
    progress: bool = True,
) -> Candidate | None:
    """Merge, evaluate, gate and register a candidate over `specialists` (None without any).

    `baselines=False` merges and scores R²M alone (the intermediate steps of a backlog, see
    `r2m.pipeline.loop`); the gate reads the same numbers either way."""
    if not specialists:
        return None
    key = candidate_key(specialists, params)
    existing = find_candidate(client, CANDIDATE_KEY, key)
    if existing is not None:  # the key is the last tag written: this candidate is complete
        return _from_version(existing, True, params, client)

    folder = params.path("artifacts") / "candidates" / key[:16]
    paths = [s.path for s in specialists]
    # the seen tasks are those of the merged specialists: a rejected specialist's data (maybe
    # poisoned) neither chooses hyperparameters nor judges the candidate
    seen = [d for d in seen if d.name in {s.generator for s in specialists}]
    method = plan(params.merge).method.name
    merged, selection = merge_methods(params, pretrained, paths, seen, folder, baselines=baselines)

    names = [specialist_name(s.generator) for s in specialists]
    models = {name: s.path for name, s in zip(names, specialists)}
    models.update(merged)
    kinds = {}
    if all_in_one is not None:
        models["all-in-one"] = all_in_one
    champion = champion_checkpoint(params, client)
    if champion is not None:
        models[CHAMPION_MODEL] = champion
        kinds[CHAMPION_MODEL] = "champion"
    roles = Roles(method, tuple(names), CHAMPION_MODEL if champion is not None else None,
                  compared=tuple(m for m in models if m not in names and m not in (method, CHAMPION_MODEL)))
    verdict = judge(models, [*seen, *unseen], params, roles, kinds=kinds, progress=progress,
                    score_cache=params.path("artifacts") / "scores")

    candidate_path = merged[method]
    meta = read_meta(candidate_path)
    run_id = runs.log_verdict(
        params, verdict, checkpoint=candidate_path,
        merge_params={"method": method, **(meta.get("hparams") or {}),
                      "selected_on": "seen validation" if selection else "params.yaml",
                      "baselines": {b: read_meta(p).get("hparams") for b, p in merged.items() if b != method}},
        tags={CANDIDATE_KEY: key, **({"hierarchy": json.dumps(meta["hparams"]["hierarchy"]["groups"], sort_keys=True)}
                                     if "hierarchy" in (meta.get("hparams") or {}) else {})},
        mlflow_client=client,
    )
    gate = verdict.gate
    lineage = {s.generator: {"version": s.version, "data_hash": s.data_hash} for s in specialists}
    mv = registry.register_candidate(client, run_id, gate_passed=gate.passed, gate_reason=gate.reason, meta=meta,
                                     specialists=lineage, tags={
                                         ARTIFACT_URI_TAG: checkpoint_uri(run_id, candidate_path.name),
                                         "hparams": json.dumps(meta.get("hparams") or {}, sort_keys=True),
                                         CANDIDATE_KEY: key,
                                         **({"hierarchy": json.dumps((meta.get("hparams") or {})["hierarchy"]["groups"],
                                                                     sort_keys=True)}
                                            if "hierarchy" in (meta.get("hparams") or {}) else {}),
                                     })
    return _from_version(client.get_model_version(registry.DETECTOR, str(mv.version)), False, params, client,
                         report=gate.as_dict())
