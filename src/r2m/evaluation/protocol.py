"""The evaluation protocol (paper §4, SPEC section 6): AUC matrices over models × tasks,
DROP on seen tasks, GAIN on unseen sets, champion regression, and the paper's tables.

Everything here is pure: it reads an `Evaluation` (scores already computed by
`r2m.evaluation.scoring`) and returns numbers and `Table`s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

from r2m.errors import EvaluationError
from r2m.evaluation.metrics import TaskMetrics
from r2m.evaluation.report import Table, mean

AUCMatrix = Mapping[str, Mapping[str, float]]  # model -> task -> AUC


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
    """Every model scored on every task: `metrics[model][task]`, raw scores for ROC curves."""

    tasks: list[Task]
    models: dict[str, ModelInfo]
    metrics: dict[str, dict[str, TaskMetrics]]
    scores: dict[str, dict[str, tuple[list[int], list[float]]]] = field(default_factory=dict)

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


def _get(auc: AUCMatrix, model: str, task: str) -> float:
    try:
        return float(auc[model][task])
    except KeyError:
        raise EvaluationError(f"model '{model}' was not scored on task '{task}'") from None


def reference_specialists(
    auc: AUCMatrix, specialists: Mapping[str, str | None], seen: Sequence[str],
    task_families: Mapping[str, str] | None = None, specialist_families: Mapping[str, str | None] | None = None,
) -> dict[str, str]:
    """The θ_i that DROP_i compares against, for the seen tasks that have one: the specialist
    trained on task i (its generator is the task); else -- Protocol 2, the same forgery family in
    another domain -- the best specialist of the task's family (paper Table A.2: "best specialist
    AUC"). A task with neither has no DROP: it never had a specialist to retain (shown "–")."""
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
            reference[task] = max(same, key=lambda s: _get(auc, s, task))
    return reference


def drops(auc: AUCMatrix, candidate: str, reference: Mapping[str, str]) -> dict[str, float]:
    """DROP_i = AUC_i(θ_i) − AUC_i(θ*) on each seen task i (paper §4; lower is better)."""
    return {t: _get(auc, s, t) - _get(auc, candidate, t) for t, s in reference.items()}


def gains(
    auc: AUCMatrix, candidate: str, specialists: Sequence[str], unseen: Sequence[str]
) -> dict[str, float]:
    """GAIN_j = AUC_j(θ*) − max_i AUC_j(θ_i) on each unseen set j (paper §4; higher is better)."""
    if not specialists:
        raise EvaluationError("GAIN needs at least one specialist")
    return {
        j: _get(auc, candidate, j) - max(_get(auc, s, j) for s in specialists) for j in unseen
    }


def macro_gain(
    auc: AUCMatrix, candidate: str, specialists: Sequence[str], unseen: Sequence[str]
) -> tuple[float, str]:
    """Macro GAIN = mean_j AUC_j(θ*) − max_i mean_j AUC_j(θ_i) (paper §4.2, Table 2's mean
    column); also returns the best specialist by that mean."""
    if not unseen:
        raise EvaluationError("macro GAIN needs at least one unseen set")
    means = {s: sum(_get(auc, s, j) for j in unseen) / len(unseen) for s in specialists}
    best = max(means, key=means.__getitem__)
    cand = sum(_get(auc, candidate, j) for j in unseen) / len(unseen)
    return cand - means[best], best


def champion_regression(auc: AUCMatrix, candidate: str, champion: str) -> dict[str, float]:
    """AUC(θ*) − AUC(champion) on every task both were scored on (negative = regression)."""
    shared = [t for t in auc.get(candidate, {}) if t in auc.get(champion, {})]
    if not shared:
        raise EvaluationError(f"'{candidate}' and champion '{champion}' share no scored task")
    return {t: _get(auc, candidate, t) - _get(auc, champion, t) for t in shared}


@dataclass(frozen=True)
class ProtocolSummary:
    """Every number the gate reads, for one candidate θ*."""

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
    best_specialist_unseen: str | None
    champion: str | None = None
    regression: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(
    evaluation: Evaluation,
    candidate: str,
    *,
    specialists: Sequence[str] | None = None,
    champion: str | None = None,
) -> ProtocolSummary:
    """DROP, GAIN and champion regression of `candidate` (SPEC section 6)."""
    if candidate not in evaluation.metrics:
        raise EvaluationError(f"candidate '{candidate}' was not scored")
    auc = evaluation.auc()
    all_specs = evaluation.specialists()
    specs = {s: all_specs.get(s) for s in (specialists if specialists is not None else all_specs)}
    seen = [t.name for t in evaluation.seen]
    unseen = [t.name for t in evaluation.unseen]
    drop: dict[str, float] = {}
    reference: dict[str, str] = {}
    gain: dict[str, float] = {}
    gain_macro = best = None
    if specs:
        task_families = {t.name: t.family for t in evaluation.tasks}
        spec_families = {s: evaluation.models[s].family or task_families.get(g or "") for s, g in specs.items()}
        reference = reference_specialists(auc, specs, seen, task_families, spec_families)
        drop = drops(auc, candidate, reference)
        gain = gains(auc, candidate, list(specs), unseen)
        if unseen:
            gain_macro, best = macro_gain(auc, candidate, list(specs), unseen)
    return ProtocolSummary(
        candidate=candidate,
        seen_auc={t: _get(auc, candidate, t) for t in seen},
        unseen_auc={t: _get(auc, candidate, t) for t in unseen},
        drop=drop,
        reference=reference,
        drop_max=max(drop.values()) if drop else None,
        drop_mean=mean(list(drop.values())),
        gain=gain,
        gain_mean=mean(list(gain.values())),
        gain_macro=gain_macro,
        best_specialist_unseen=best,
        champion=champion,
        regression=champion_regression(auc, candidate, champion) if champion else {},
    )


# ---------------------------------------------------------------- tables (paper Tables 1-2, A.2-A.3)


def _seen_columns(evaluation: Evaluation) -> list[tuple[str, list[str]]]:
    """Seen tasks grouped by domain, like Table 1 (Protocol 1 - FF | Protocol 2 - CDF)."""
    by_domain: dict[str, list[str]] = {}
    for t in sorted(evaluation.seen, key=lambda t: (t.domain, t.family, t.name)):
        by_domain.setdefault(t.domain, []).append(t.name)
    return list(by_domain.items())


def seen_auc_table(evaluation: Evaluation, models: Sequence[str] | None = None) -> Table:
    """Rows = models (specialists, All-in-one, mergers), columns = seen tasks + domain means."""
    models = list(models or evaluation.metrics)
    auc = evaluation.auc()
    groups = _seen_columns(evaluation)
    columns: list[str] = []
    for domain, tasks in groups:
        columns += tasks + [f"{domain} mean"]
    values = []
    for m in models:
        row: list[float | None] = []
        for _, tasks in groups:
            cells = [auc.get(m, {}).get(t) for t in tasks]
            row += cells + [mean(cells)]
        values.append(row)
    return Table("seen_auc", "Seen AUC (higher is better)", "model", models, columns, values)


def unseen_auc_table(evaluation: Evaluation, models: Sequence[str] | None = None) -> Table:
    """Rows = models, columns = unseen sets + their mean (Table 2 shape)."""
    models = list(models or evaluation.metrics)
    auc = evaluation.auc()
    tasks = [t.name for t in evaluation.unseen]
    values = []
    for m in models:
        cells = [auc.get(m, {}).get(t) for t in tasks]
        values.append(cells + [mean(cells)])
    return Table(
        "unseen_auc", "Unseen AUC (higher is better)", "model", models, [*tasks, "mean"], values
    )


def specialist_matrix_table(evaluation: Evaluation) -> Table:
    """Specialists × every task (seen and unseen): the specialists' AUC heatmap."""
    specs = evaluation.of_kind("specialist")
    auc = evaluation.auc()
    tasks = [t.name for t in evaluation.tasks]
    values = [[auc.get(s, {}).get(t) for t in tasks] for s in specs]
    return Table("specialist_auc", "Specialists × tasks AUC", "specialist", specs, tasks, values)


def _per_method_table(evaluation: Evaluation, methods: Sequence[str], name: str, title: str,
                      row_header: str, tasks: list[str], per_task: str, totals: dict[str, str]) -> Table:
    """Rows = tasks then aggregate rows, columns = methods; cells read from each method's summary."""
    summaries = {m: summarize(evaluation, m) for m in methods}
    values = [[getattr(summaries[m], per_task).get(t) for m in methods] for t in tasks]
    values += [[getattr(summaries[m], field) for m in methods] for field in totals.values()]
    return Table(name, title, row_header, [*tasks, *totals], list(methods), values)


def drop_table(evaluation: Evaluation, methods: Sequence[str]) -> Table:
    """Rows = seen tasks, columns = methods: DROP_i (Fig. 4a / Table A.2), + mean and max rows."""
    return _per_method_table(
        evaluation, methods, "drop", "DROP = specialist AUC − merged AUC on seen tasks (lower is better)",
        "task", [t.name for t in evaluation.seen], "drop", {"mean": "drop_mean", "max": "drop_max"},
    )


def gain_table(evaluation: Evaluation, methods: Sequence[str]) -> Table:
    """Rows = unseen sets, columns = methods: GAIN_j (Fig. 4b / Table A.3), + mean and macro rows."""
    return _per_method_table(
        evaluation, methods, "gain", "GAIN = merged AUC − best specialist AUC on unseen sets (higher is better)",
        "unseen set", [t.name for t in evaluation.unseen], "gain", {"mean": "gain_mean", "macro": "gain_macro"},
    )


def metrics_table(evaluation: Evaluation, model: str) -> Table:
    """One model's AUC, EER, AP and video AUC on every task."""
    cols = ["role", "auc", "eer", "ap", "video_auc", "n_real", "n_fake"]
    rows, values = [], []
    for t in evaluation.tasks:
        tm = evaluation.metrics.get(model, {}).get(t.name)
        if tm is None:
            continue
        rows.append(t.name)
        values.append([t.role, tm.auc, tm.eer, tm.ap, tm.video_auc, tm.n_real, tm.n_fake])
    return Table(f"metrics_{model}", f"{model}: per-task metrics", "task", rows, cols, values)


def pareto_points(evaluation: Evaluation, methods: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Fig. 5: each method's (mean DROP, mean GAIN)."""
    out = {}
    for m in methods:
        s = summarize(evaluation, m)
        if s.drop_mean is not None and s.gain_mean is not None:
            out[m] = (s.drop_mean, s.gain_mean)
    return out


def regression_table(summary: ProtocolSummary) -> Table:
    """Candidate − champion AUC per task (negative = regression)."""
    tasks = list(summary.regression)
    return Table(
        "champion_regression",
        f"AUC({summary.candidate}) − AUC(champion) (negative = regression)",
        "task",
        tasks,
        ["delta_auc"],
        [[summary.regression[t]] for t in tasks],
    )
