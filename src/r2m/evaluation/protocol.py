"""The evaluation protocol (paper §4; docs/method.md, "Evaluation and gate"): AUC matrices over
models × tasks, DROP on seen tasks, GAIN on unseen sets, regression against the champion.

Everything here is pure: it reads an `Evaluation` (scores already computed by
`r2m.evaluation.scoring`) and returns numbers. Each number is a function of the AUC matrix
alone (`numbers`), written with numpy operations so the same function gives the point estimate
(floats) and, applied to the AUC matrices of bootstrap resamples (arrays), its interval
(`r2m.evaluation.uncertainty`).

Signs: DROP_i = AUC_i(θ_i) − AUC_i(θ*) (a loss, lower is better), GAIN_j = AUC_j(θ*) − max_i
AUC_j(θ_i) (higher is better), regression_t = AUC_t(champion) − AUC_t(θ*) (a loss).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

from r2m.errors import EvaluationError
from r2m.evaluation.metrics import TaskMetrics

AUCMatrix = Mapping[str, Mapping[str, "float | np.ndarray"]]  # model -> task -> AUC (or AUCs of resamples)


@dataclass(frozen=True)
class Task:
    """One evaluation task: a generator dataset's test split (seen) or an unseen set."""

    name: str
    family: str
    domain: str
    role: str  # "seen" | "unseen"


@dataclass(frozen=True)
class ModelInfo:
    """A scored model: `kind` from its checkpoint sidecar (specialist, merged, all-in-one...)."""

    name: str
    kind: str
    generator: str | None = None  # the specialist's own generator
    path: str | None = None
    sha256: str | None = None
    family: str | None = None  # the specialist's forgery family (FS, FR, EFS...)


@dataclass
class Evaluation:
    """Every model scored on every task: `metrics[model][task]`, raw scores `scores[model][task]`
    = (labels, scores) for ROC curves and intervals, and each task's image groups (`groups[task]`:
    the source or video of each image, in score order) for the grouped bootstrap."""

    tasks: list[Task]
    models: dict[str, ModelInfo]
    metrics: dict[str, dict[str, TaskMetrics]]
    scores: dict[str, dict[str, tuple[list[int], list[float]]]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def seen(self) -> list[Task]:
        return [t for t in self.tasks if t.role == "seen"]

    @property
    def unseen(self) -> list[Task]:
        return [t for t in self.tasks if t.role == "unseen"]

    def auc(self) -> dict[str, dict[str, float]]:
        return {m: {t: tm.auc for t, tm in per_task.items()} for m, per_task in self.metrics.items()}

    def of_kind(self, *kinds: str) -> list[str]:
        return [name for name, info in self.models.items() if info.kind in kinds]

    def specialists(self) -> dict[str, str | None]:
        """Specialist model name -> its generator."""
        return {n: self.models[n].generator for n in self.of_kind("specialist")}


def _get(auc: AUCMatrix, model: str, task: str):
    try:
        return auc[model][task]
    except KeyError:
        raise EvaluationError(f"model '{model}' was not scored on task '{task}'") from None


def _mean(values: list):
    return sum(values) / len(values)


def _best(values: list):
    return np.maximum.reduce(values) if len(values) > 1 else values[0]


def _worst(values: list):
    return np.minimum.reduce(values) if len(values) > 1 else values[0]


def reference_specialists(
    auc: AUCMatrix, specialists: Mapping[str, str | None], seen: Sequence[str],
    task_families: Mapping[str, str] | None = None, specialist_families: Mapping[str, str | None] | None = None,
) -> dict[str, str]:
    """The θ_i that DROP_i compares against, for the seen tasks that have one: the specialist
    trained on task i (its generator is the task); else -- Protocol 2, the same forgery family in
    another domain -- the best specialist of the task's family (paper Table A.2: "best specialist
    AUC"). A task with neither has no DROP: it never had a specialist to retain (shown "–").
    Chosen on the point estimates and kept fixed for the intervals."""
    if not specialists:
        raise EvaluationError("DROP needs at least one specialist")
    own = {gen: name for name, gen in specialists.items() if gen}
    task_families, specialist_families = task_families or {}, specialist_families or {}
    reference = {}
    for task in seen:
        if task in own:
            reference[task] = own[task]
            continue
        family = task_families.get(task)
        same = [s for s in specialists if family is not None and specialist_families.get(s) == family]
        if same:
            reference[task] = max(same, key=lambda s: float(_get(auc, s, task)))
    return reference


@dataclass(frozen=True)
class Roles:
    """Who is who in one judgement: the candidate θ*, the specialists its DROP and GAIN compare
    against, the champion it must not regress from, and the methods scored beside it."""

    candidate: str
    specialists: tuple[str, ...] = ()
    champion: str | None = None
    compared: tuple[str, ...] = ()  # baselines, All-in-one: summarised like the candidate, not gated

    @property
    def methods(self) -> tuple[str, ...]:
        return (self.candidate, *(m for m in self.compared if m != self.candidate))


@dataclass(frozen=True)
class Layout:
    """The fixed structure every resample shares: task lists and the DROP references."""

    seen: tuple[str, ...]
    unseen: tuple[str, ...]
    reference: dict[str, str]
    specialists: tuple[str, ...]
    champion_tasks: tuple[str, ...] = ()  # tasks both the candidate and the champion were scored on
    domains: dict[str, tuple[str, ...]] = field(default_factory=dict)  # seen tasks per domain (Table 1's groups)


def method_numbers(auc: AUCMatrix, method: str, lay: Layout) -> dict[str, object]:
    """One method's AUCs, DROP (seen) and GAIN (unseen) numbers (paper §4)."""
    out: dict[str, object] = {}
    for task in (*lay.seen, *lay.unseen):
        out[f"auc/{task}"] = _get(auc, method, task)
    if lay.seen:
        out["auc_seen_mean"] = _mean([out[f"auc/{t}"] for t in lay.seen])
        out["auc_seen_min"] = _worst([out[f"auc/{t}"] for t in lay.seen])
    if lay.unseen:
        out["auc_unseen_mean"] = _mean([out[f"auc/{t}"] for t in lay.unseen])
    drop = {t: _get(auc, s, t) - out[f"auc/{t}"] for t, s in lay.reference.items()}  # DROP_i
    out.update({f"drop/{t}": v for t, v in drop.items()})
    if drop:
        out["drop_max"] = _best(list(drop.values()))
        out["drop_mean"] = _mean(list(drop.values()))
    if lay.specialists and lay.unseen:
        gain = {j: out[f"auc/{j}"] - _best([_get(auc, s, j) for s in lay.specialists]) for j in lay.unseen}  # GAIN_j
        out.update({f"gain/{j}": v for j, v in gain.items()})
        out["gain_mean"] = _mean(list(gain.values()))
        # macro: mean_j AUC_j(θ*) − max_i mean_j AUC_j(θ_i) (paper §4.2, Table 2's mean column)
        out["gain_macro"] = out["auc_unseen_mean"] - _best(
            [_mean([_get(auc, s, j) for j in lay.unseen]) for s in lay.specialists])
    return out


def champion_numbers(auc: AUCMatrix, candidate: str, champion: str, lay: Layout) -> dict[str, object]:
    """Regression against the champion (docs/method.md): AUC(champion) − AUC(θ*) per seen task
    both were scored on, and on the unseen sets their macro mean (the rule), with each set's
    change kept for the report's warnings."""
    seen = [t for t in lay.champion_tasks if t in lay.seen]
    unseen = [t for t in lay.champion_tasks if t in lay.unseen]
    out: dict[str, object] = {}
    for t in seen:
        out[f"regression/{t}"] = _get(auc, champion, t) - _get(auc, candidate, t)
    if seen:
        out["regression_max"] = _best([out[f"regression/{t}"] for t in seen])
    for j in unseen:
        out[f"unseen_regression/{j}"] = _get(auc, champion, j) - _get(auc, candidate, j)
    if unseen:
        out["regression_unseen_macro"] = _mean([out[f"unseen_regression/{j}"] for j in unseen])
    return out


def table_numbers(auc: AUCMatrix, model: str, lay: Layout) -> dict[str, object]:
    """One model's row of the AUC tables: AUC per task, the mean per seen domain, the unseen mean."""
    per_task = auc[model]
    out: dict[str, object] = {f"auc/{t}": v for t, v in per_task.items()}
    for domain, tasks in lay.domains.items():
        if all(t in per_task for t in tasks):
            out[f"auc_mean/{domain}"] = _mean([per_task[t] for t in tasks])
    if lay.unseen and all(t in per_task for t in lay.unseen):
        out["auc_unseen_mean"] = _mean([per_task[t] for t in lay.unseen])
    return out


def numbers(auc: AUCMatrix, roles: Roles, lay: Layout) -> dict[str, dict[str, object]]:
    """Every number of a report, per model (`numbers[model][name]`): each scored model's AUC
    table row, the candidate's and each compared method's `method_numbers`, and the candidate's
    `champion_numbers`."""
    out = {model: table_numbers(auc, model, lay) for model in auc}
    for m in roles.methods:
        out[m].update(method_numbers(auc, m, lay))
    if roles.champion is not None:
        out[roles.candidate].update(champion_numbers(auc, roles.candidate, roles.champion, lay))
    return out


def layout(evaluation: Evaluation, roles: Roles) -> Layout:
    """The structure of `evaluation` for `roles`: seen and unseen tasks, DROP references, and
    the tasks the champion shares with the candidate."""
    for name in (roles.candidate, *roles.compared, *roles.specialists, *([roles.champion] if roles.champion else [])):
        if name not in evaluation.metrics:
            raise EvaluationError(f"model '{name}' was not scored" if name != roles.candidate
                                  else f"candidate '{name}' was not scored")
    auc = evaluation.auc()
    seen = tuple(t.name for t in evaluation.seen)
    unseen = tuple(t.name for t in evaluation.unseen)
    reference: dict[str, str] = {}
    if roles.specialists:
        generators = {s: evaluation.models[s].generator for s in roles.specialists}
        task_families = {t.name: t.family for t in evaluation.tasks}
        spec_families = {s: evaluation.models[s].family or task_families.get(g or "") for s, g in generators.items()}
        reference = reference_specialists(auc, generators, seen, task_families, spec_families)
    shared: tuple[str, ...] = ()
    if roles.champion is not None:
        shared = tuple(t for t in (*seen, *unseen) if t in auc[roles.champion] and t in auc[roles.candidate])
        if not shared:
            raise EvaluationError(f"'{roles.candidate}' and champion '{roles.champion}' share no scored task")
    domains: dict[str, list[str]] = {}
    for t in sorted(evaluation.seen, key=lambda t: (t.domain, t.family, t.name)):
        domains.setdefault(t.domain, []).append(t.name)
    return Layout(seen, unseen, reference, tuple(roles.specialists), shared,
                  {d: tuple(ts) for d, ts in domains.items()})


@dataclass(frozen=True)
class ProtocolSummary:
    """Every number the gate reads, for one method θ*, with its 95 % interval where one was
    computed (`intervals[name] = (low, high)`, names as in `numbers`: `drop/<task>`,
    `drop_max`, `gain_macro`, `regression/<task>`, `auc/<task>`, ...)."""

    candidate: str
    seen_auc: dict[str, float]
    unseen_auc: dict[str, float]
    drop: dict[str, float]
    reference: dict[str, str]  # seen task -> the specialist its DROP compares against
    drop_max: float | None
    drop_mean: float | None
    gain: dict[str, float]
    gain_mean: float | None
    gain_macro: float | None
    champion: str | None = None
    regression: dict[str, float] = field(default_factory=dict)  # seen task -> AUC(champion) − AUC(θ*)
    regression_max: float | None = None
    unseen_regression: dict[str, float] = field(default_factory=dict)  # unseen set -> AUC(champion) − AUC(θ*)
    regression_unseen_macro: float | None = None
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    def interval(self, name: str) -> tuple[float, float] | None:
        return self.intervals.get(name)

    def as_dict(self) -> dict:
        return asdict(self)


def _prefixed(values: Mapping[str, object], prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: float(v) for k, v in values.items() if k.startswith(prefix)}


def summary_of(method: str, values: Mapping[str, object], lay: Layout, champion: str | None = None,
               intervals: Mapping[str, tuple[float, float]] | None = None) -> ProtocolSummary:
    """A `ProtocolSummary` from one method's `numbers` (point estimates)."""
    def get(name: str) -> float | None:
        return float(values[name]) if name in values else None

    return ProtocolSummary(
        candidate=method,
        seen_auc={t: float(values[f"auc/{t}"]) for t in lay.seen},
        unseen_auc={t: float(values[f"auc/{t}"]) for t in lay.unseen},
        drop=_prefixed(values, "drop/"),
        reference=dict(lay.reference),
        drop_max=get("drop_max"),
        drop_mean=get("drop_mean"),
        gain=_prefixed(values, "gain/"),
        gain_mean=get("gain_mean"),
        gain_macro=get("gain_macro"),
        champion=champion,
        regression=_prefixed(values, "regression/"),
        regression_max=get("regression_max"),
        unseen_regression=_prefixed(values, "unseen_regression/"),
        regression_unseen_macro=get("regression_unseen_macro"),
        intervals=dict(intervals or {}),
    )


def summarize(
    evaluation: Evaluation,
    candidate: str,
    *,
    specialists: Sequence[str] | None = None,
    champion: str | None = None,
) -> ProtocolSummary:
    """DROP, GAIN and champion regression of `candidate`, point estimates only (the intervals
    come with `r2m.evaluation.judge`)."""
    if candidate not in evaluation.metrics:
        raise EvaluationError(f"candidate '{candidate}' was not scored")
    roles = Roles(candidate, tuple(specialists if specialists is not None else evaluation.of_kind("specialist")),
                  champion)
    lay = layout(evaluation, roles)
    return summary_of(candidate, numbers(evaluation.auc(), roles, lay)[candidate], lay, champion)


def pareto_points(summaries: Mapping[str, ProtocolSummary]) -> dict[str, tuple[float, float]]:
    """Fig. 5: each method's (mean DROP, mean GAIN)."""
    return {m: (s.drop_mean, s.gain_mean) for m, s in summaries.items()
            if s.drop_mean is not None and s.gain_mean is not None}
