"""Judging a candidate: models, datasets and roles in; scores, numbers with intervals and the
gate's verdict out. The one path every caller takes: the loop's re-merge step
(`r2m.pipeline.candidate`), the DVC stage (`r2m.pipeline.dvc_stages`) and `r2m evaluate` /
`r2m gate`. What a report shows is made from a `Verdict` by `r2m.evaluation.reporting`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from r2m.config import GateConfig, Params
from r2m.data import GeneratorDataset
from r2m.evaluation.gate import GateReport, check_gate
from r2m.evaluation.protocol import Evaluation, Layout, ProtocolSummary, Roles, layout, numbers, summary_of
from r2m.evaluation.uncertainty import BootstrapConfig, Interval, TaskPairs, bootstrap_intervals

SEP = "|"  # model|number in the bootstrap's flat names (model and task names never hold it)


@dataclass
class Verdict:
    """Everything one judgement produced."""

    evaluation: Evaluation
    roles: Roles
    layout: Layout
    summaries: dict[str, ProtocolSummary]  # the candidate's and each compared method's, with intervals
    intervals: dict[str, dict[str, Interval]]  # model -> number (e.g. "auc/fs-faces") -> interval
    gate: GateReport

    @property
    def summary(self) -> ProtocolSummary:
        """The candidate's summary (the one the gate read)."""
        return self.summaries[self.roles.candidate]

    @property
    def passed(self) -> bool:
        return self.gate.passed


def bootstrap_config(gate: GateConfig) -> BootstrapConfig:
    return BootstrapConfig(resamples=gate.interval_resamples, level=gate.interval_level, seed=gate.interval_seed)


def intervals_of(evaluation: Evaluation, roles: Roles, lay: Layout, cfg: BootstrapConfig) -> dict[str, dict[str, Interval]]:
    """A 95 % interval for every number `numbers` gives (paired grouped bootstrap)."""
    tasks = []
    for task in evaluation.tasks:
        scored = {m: per[task.name] for m, per in evaluation.scores.items() if task.name in per}
        if not scored:
            continue
        labels = next(iter(scored.values()))[0]
        groups = evaluation.groups.get(task.name) or [str(i) for i in range(len(labels))]  # no groups: images
        tasks.append(TaskPairs(task.name, labels, groups, {m: s for m, (_, s) in scored.items()}))

    def flat(auc) -> dict:
        return {f"{m}{SEP}{k}": v for m, per in numbers(auc, roles, lay).items() for k, v in per.items()}

    out: dict[str, dict[str, Interval]] = {}
    for name, interval in bootstrap_intervals(tasks, flat, cfg).items():
        model, number = name.split(SEP, 1)
        out.setdefault(model, {})[number] = interval
    return out


def judge_evaluation(evaluation: Evaluation, roles: Roles, gate: GateConfig) -> Verdict:
    """Summaries with intervals for the candidate and every compared method, and the gate's
    verdict on the candidate, from scores already computed."""
    lay = layout(evaluation, roles)
    points = numbers(evaluation.auc(), roles, lay)
    intervals = intervals_of(evaluation, roles, lay, bootstrap_config(gate)) if evaluation.scores else {}
    summaries = {}
    for method in roles.methods:
        own = {k: (iv.low, iv.high) for k, iv in intervals.get(method, {}).items()}
        champion = roles.champion if method == roles.candidate else None
        summaries[method] = summary_of(method, points[method], lay, champion, own)
    report = check_gate(summaries[roles.candidate], gate)
    return Verdict(evaluation, roles, lay, summaries, intervals, report)


def judge(
    models: Mapping[str, Path | str],
    datasets: Sequence[GeneratorDataset],
    params: Params,
    roles: Roles,
    *,
    kinds: Mapping[str, str] | None = None,
    score_cache: Path | None = None,
    progress: bool = True,
) -> Verdict:
    """Score `models` (name -> checkpoint) on every dataset's test split, then `judge_evaluation`."""
    from r2m.evaluation.scoring import evaluate_models

    evaluation = evaluate_models(models, datasets, params, kinds=kinds, progress=progress, score_cache=score_cache)
    return judge_evaluation(evaluation, roles, params.gate)


__all__ = ["Verdict", "judge", "judge_evaluation"]
