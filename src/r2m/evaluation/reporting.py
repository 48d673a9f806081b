"""A verdict as people read it: the one module that turns a `Verdict` into every table, plot,
flat metric and line of text a report contains.

- `tables(verdict)`: the paper's shapes — seen AUC per model (Table 1, seen tasks grouped by
  domain with each domain's mean), unseen AUC (Table 2), specialists × tasks, DROP and GAIN per
  method (Tables A.2-A.3), the candidate's per-task metrics, the champion comparison and the
  gate's rules; every AUC, DROP, GAIN and regression with its 95 % interval;
- `plots(verdict, folder)`: ROC curves, DROP/GAIN heatmaps (Fig. 4), the Pareto plot (Fig. 5);
- `metrics(verdict)`: one flat dict (MLflow metrics, `dvc metrics show`);
- `gate_lines(report)` / `gate_markdown(report)`: the gate's verdict as text, from the gate
  report's JSON form, so a verdict computed now and one read back from MLflow render alike;
- `write(verdict, folder)`: all of it on disk (what a merge run logs and the DVC stage keeps).

`r2m.tracking` only logs what this module wrote; the CLI and the flows only print it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from r2m.evaluation import plots
from r2m.evaluation.judge import Verdict
from r2m.evaluation.protocol import Evaluation
from r2m.evaluation.report import Table, write_tables
from r2m.fileio import atomic_write_json, atomic_write_text


def _bounds(verdict: Verdict, model: str, number: str) -> tuple[float, float] | None:
    iv = verdict.intervals.get(model, {}).get(number)
    return None if iv is None else (iv.low, iv.high)


def model_rows(verdict: Verdict) -> list[str]:
    """Specialists first, then the candidate, the compared methods and the champion."""
    ev = verdict.evaluation
    specialists = ev.of_kind("specialist")
    return [*specialists, *(m for m in ev.metrics if m not in specialists)]


def _auc_table(verdict: Verdict, name: str, title: str, columns: list[tuple[str, str]], models: Sequence[str]) -> Table:
    """Rows = models; columns (header, number name) read from each model's numbers."""
    ev = verdict.evaluation
    values, intervals = [], []
    for m in models:
        row, bounds = [], []
        for _, number in columns:
            row.append(_number(ev, verdict, m, number))
            bounds.append(_bounds(verdict, m, number))
        values.append(row)
        intervals.append(bounds)
    return Table(name, title, "model", list(models), [c for c, _ in columns], values, intervals=intervals)


def _number(ev: Evaluation, verdict: Verdict, model: str, number: str) -> float | None:
    if number.startswith("auc/"):
        tm = ev.metrics.get(model, {}).get(number[4:])
        return None if tm is None else tm.auc
    if number.startswith("auc_mean/"):
        tasks = verdict.layout.domains.get(number[9:], ())
        cells = [ev.metrics.get(model, {}).get(t) for t in tasks]
        return None if not cells or None in cells else sum(c.auc for c in cells) / len(cells)
    if number == "auc_unseen_mean":
        cells = [ev.metrics.get(model, {}).get(t) for t in verdict.layout.unseen]
        return None if not cells or None in cells else sum(c.auc for c in cells) / len(cells)
    raise KeyError(number)


def seen_auc_table(verdict: Verdict) -> Table:
    """Table 1 shape: seen tasks grouped by domain, each group followed by its mean."""
    columns: list[tuple[str, str]] = []
    for domain, tasks in verdict.layout.domains.items():
        columns += [(t, f"auc/{t}") for t in tasks] + [(f"{domain} mean", f"auc_mean/{domain}")]
    return _auc_table(verdict, "seen_auc", "Seen AUC [95 % interval] (higher is better)", columns, model_rows(verdict))


def unseen_auc_table(verdict: Verdict) -> Table:
    """Table 2 shape: unseen sets and their mean."""
    columns = [(t, f"auc/{t}") for t in verdict.layout.unseen] + [("mean", "auc_unseen_mean")]
    return _auc_table(verdict, "unseen_auc", "Unseen AUC [95 % interval] (higher is better)", columns,
                      model_rows(verdict))


def specialist_table(verdict: Verdict) -> Table:
    """Specialists × every task: how each transfers (the heatmap that shows saturation)."""
    tasks = [t.name for t in verdict.evaluation.tasks]
    table = _auc_table(verdict, "specialist_auc", "Specialists × tasks AUC [95 % interval]",
                       [(t, f"auc/{t}") for t in tasks], verdict.evaluation.of_kind("specialist"))
    return Table(table.name, table.title, "specialist", table.rows, table.columns, table.values,
                 intervals=table.intervals)


def _per_method(verdict: Verdict, name: str, title: str, row_header: str, per_task: str,
                tasks: Sequence[str], totals: Mapping[str, str]) -> Table:
    """Rows = tasks then aggregate rows, columns = methods; cells from each method's summary."""
    methods = list(verdict.roles.methods)
    rows = [*tasks, *totals]
    keys = [f"{per_task}/{t}" for t in tasks] + list(totals.values())
    values, intervals = [], []
    for key in keys:
        row, bounds = [], []
        for m in methods:
            s = verdict.summaries[m]
            if "/" in key:
                row.append(getattr(s, per_task).get(key.split("/", 1)[1]))
            else:
                row.append(getattr(s, key))
            bounds.append(s.interval(key))
        values.append(row)
        intervals.append(bounds)
    return Table(name, title, row_header, rows, methods, values, intervals=intervals)


def drop_table(verdict: Verdict) -> Table:
    """Rows = seen tasks (+ mean, max), columns = methods: DROP_i (Fig. 4a / Table A.2)."""
    return _per_method(verdict, "drop", "DROP = specialist AUC − merged AUC on seen tasks [95 % interval] "
                       "(lower is better)", "task", "drop", list(verdict.layout.seen),
                       {"mean": "drop_mean", "max": "drop_max"})


def gain_table(verdict: Verdict) -> Table:
    """Rows = unseen sets (+ mean, macro), columns = methods: GAIN_j (Fig. 4b / Table A.3)."""
    return _per_method(verdict, "gain", "GAIN = merged AUC − best specialist AUC on unseen sets [95 % interval] "
                       "(higher is better)", "unseen set", "gain", list(verdict.layout.unseen),
                       {"mean": "gain_mean", "macro": "gain_macro"})


def metrics_table(verdict: Verdict, model: str | None = None) -> Table:
    """One model's AUC (with interval), EER, AP and video AUC on every task."""
    model = model or verdict.roles.candidate
    ev = verdict.evaluation
    cols = ["role", "auc", "eer", "ap", "video_auc", "n_real", "n_fake"]
    rows, values, intervals = [], [], []
    for t in ev.tasks:
        tm = ev.metrics.get(model, {}).get(t.name)
        if tm is None:
            continue
        rows.append(t.name)
        values.append([t.role, tm.auc, tm.eer, tm.ap, tm.video_auc, tm.n_real, tm.n_fake])
        intervals.append([None, _bounds(verdict, model, f"auc/{t.name}"), None, None, None, None, None])
    return Table(f"metrics_{model}", f"{model}: per-task metrics", "task", rows, cols, values, intervals=intervals)


def champion_table(verdict: Verdict) -> Table:
    """AUC(champion) − AUC(candidate) per task: the rule on seen tasks, a warning on unseen sets."""
    s = verdict.summary
    rows, values, intervals = [], [], []
    for t, v in s.regression.items():
        rows.append(t)
        values.append([v, "rule (per seen task)"])
        intervals.append([s.interval(f"regression/{t}"), None])
    for j, v in s.unseen_regression.items():
        rows.append(j)
        values.append([v, "warning only"])
        intervals.append([s.interval(f"unseen_regression/{j}"), None])
    if s.regression_unseen_macro is not None:
        rows.append("unseen macro mean")
        values.append([s.regression_unseen_macro, "rule (macro mean)"])
        intervals.append([s.interval("regression_unseen_macro"), None])
    return Table("champion_regression", f"AUC(champion) − AUC({s.candidate}) [95 % interval] (positive = the "
                 "candidate lost AUC)", "task", rows, ["regression", "judged as"], values, intervals=intervals)


def gate_table(report: Mapping) -> Table:
    """The gate's rules (from the gate report's JSON form)."""
    rows, values, intervals = [], [], []
    for r in report.get("rules", []):
        rows.append(r["name"])
        values.append([r["value"], f"{r['comparison']} {r['threshold']:g}", "yes" if r["passed"] else "NO",
                       "yes" if r.get("within_noise") else "", r.get("worst_task") or ""])
        low, high = r.get("low"), r.get("high")
        intervals.append([None if low is None else (low, high), None, None, None, None])
    return Table("gate", f"Gate {'passed' if report.get('passed') else 'FAILED'}: {report.get('candidate')}",
                 "rule", rows, ["value [95 % interval]", "threshold", "passed", "within noise", "worst task"],
                 values, intervals=intervals, digits=4)


def tables(verdict: Verdict) -> list[Table]:
    """Every table of the report, in reading order."""
    ev = verdict.evaluation
    out = [gate_table(verdict.gate.as_dict()), seen_auc_table(verdict)]
    if ev.unseen:
        out.append(unseen_auc_table(verdict))
    if verdict.roles.specialists:
        out.append(specialist_table(verdict))
        out.append(drop_table(verdict))
        if ev.unseen:
            out.append(gain_table(verdict))
    if verdict.roles.champion is not None:
        out.append(champion_table(verdict))
    out.append(metrics_table(verdict))
    return out


def plots_of(verdict: Verdict, tables_: Sequence[Table], folder: Path) -> list[Path]:
    """ROC curves (the candidate on every task; every model on each task), the DROP and GAIN
    heatmaps (Fig. 4), the Pareto plot with intervals (Fig. 5), the specialists × tasks heatmap."""
    ev, candidate = verdict.evaluation, verdict.roles.candidate
    by_name = {t.name: t for t in tables_}
    out: list[Path] = []
    if ev.scores.get(candidate):
        out.append(plots.roc_plot(ev.scores[candidate], f"ROC: {candidate}", folder / f"roc_{candidate}.png"))
    for task in ev.tasks:
        curves = {m: s[task.name] for m, s in ev.scores.items() if task.name in s}
        if curves:
            out.append(plots.roc_plot(curves, f"ROC on {task.name} ({task.role})", folder / f"roc_task_{task.name}.png"))
    if "drop" in by_name:
        out.append(plots.drop_heatmap(by_name["drop"], folder / "drop_heatmap.png"))
    if "gain" in by_name:
        out.append(plots.gain_heatmap(by_name["gain"], folder / "gain_heatmap.png"))
    if "specialist_auc" in by_name:
        out.append(plots.auc_heatmap(by_name["specialist_auc"], folder / "specialist_auc_heatmap.png"))
    points = {m: (s.drop_mean, s.gain_mean) for m, s in verdict.summaries.items()
              if s.drop_mean is not None and s.gain_mean is not None}
    if points:
        errors = {m: (verdict.summaries[m].interval("drop_mean"), verdict.summaries[m].interval("gain_mean"))
                  for m in points}
        out.append(plots.pareto_plot(points, folder / "drop_gain_pareto.png", intervals=errors))
    return out


# numbers of the candidate's summary that become MLflow / DVC metrics under their own names
_SUMMARY_NUMBERS = ("drop_max", "drop_mean", "gain_mean", "gain_macro", "regression_max", "regression_unseen_macro")


def summary_metrics(verdict: Verdict, method: str) -> dict[str, float | None]:
    """One method's numbers by metric name (`auc/<task>`, `drop/<task>`, `gain_macro`, ...), each
    with `<name>/ci_low` and `<name>/ci_high`."""
    ev, s = verdict.evaluation, verdict.summaries[method]
    out: dict[str, float | None] = {}
    for task, tm in ev.metrics.get(method, {}).items():
        out.update({f"auc/{task}": tm.auc, f"eer/{task}": tm.eer, f"ap/{task}": tm.ap, f"video_auc/{task}": tm.video_auc})
    out.update({f"drop/{t}": v for t, v in s.drop.items()})
    out.update({f"gain/{t}": v for t, v in s.gain.items()})
    out.update({f"regression/{t}": v for t, v in s.regression.items()})
    out.update({f"unseen_regression/{t}": v for t, v in s.unseen_regression.items()})
    out.update({k: getattr(s, k) for k in _SUMMARY_NUMBERS})
    seen, unseen = list(s.seen_auc.values()), list(s.unseen_auc.values())
    out["auc_seen_mean"] = sum(seen) / len(seen) if seen else None
    out["auc_unseen_mean"] = sum(unseen) / len(unseen) if unseen else None
    intervals = dict(s.intervals)
    intervals.update({k: (iv.low, iv.high) for k, iv in verdict.intervals.get(method, {}).items() if k.startswith("auc")})
    for name in list(out):
        if out[name] is not None and name in intervals:
            out[f"{name}/ci_low"], out[f"{name}/ci_high"] = intervals[name]
    return out


def gate_metrics(report: Mapping) -> dict[str, float]:
    out = {"gate/passed": 1.0 if report["passed"] else 0.0}
    for rule in report["rules"]:
        out[f"gate/{rule['name']}"] = rule["value"]
        out[f"gate/{rule['name']}/passed"] = 1.0 if rule["passed"] else 0.0
        out[f"gate/{rule['name']}/within_noise"] = 1.0 if rule.get("within_noise") else 0.0
    return out


def metrics(verdict: Verdict) -> dict[str, float]:
    """Every logged number of the candidate and the gate, as one flat dict of finite floats."""
    out = {**summary_metrics(verdict, verdict.roles.candidate), **gate_metrics(verdict.gate.as_dict())}
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and v == v and abs(v) != float("inf")}


def gate_lines(report: Mapping) -> list[str]:
    """The verdict as terminal lines: one per rule ([ok]/[FAIL], value, interval, within noise),
    skipped rules, warnings, then the one-line reason."""
    lines = []
    for r in report.get("rules", []):
        ci = f" [{r['low']:.4f}, {r['high']:.4f}]" if r.get("low") is not None else ""
        where = f" on {r['worst_task']}" if r.get("worst_task") else ""
        noise = "  (within noise)" if r.get("within_noise") else ""
        lines.append(f"  [{'ok' if r['passed'] else 'FAIL'}] {r['name']}: {r['value']:.4f}{ci}{where} "
                     f"{r['comparison']} {r['threshold']:g}{noise}")
    lines += [f"  [skip] {s}" for s in report.get("skipped", [])]
    lines += [f"  [warn] {w}" for w in report.get("warnings", [])]
    lines.append(report.get("reason", ""))
    return lines


def gate_markdown(report: Mapping) -> str:
    """The gate's rules as a markdown table, with skipped rules and warnings below it."""
    parts = [gate_table(report).to_markdown()]
    if report.get("skipped"):
        parts.append("Skipped: " + "; ".join(report["skipped"]))
    if report.get("warnings"):
        parts.append("\n".join(f"- warning: {w}" for w in report["warnings"]))
    return "\n".join(parts)


def evaluation_dict(evaluation: Evaluation) -> dict:
    """Every number of an evaluation as plain JSON (no raw scores)."""
    return {
        "tasks": [t.__dict__ for t in evaluation.tasks],
        "models": {n: m.__dict__ for n, m in evaluation.models.items()},
        "metrics": {m: {t: tm.as_dict() for t, tm in per.items()} for m, per in evaluation.metrics.items()},
    }


def intervals_dict(verdict: Verdict) -> dict:
    return {m: {k: [iv.low, iv.high] for k, iv in per.items()} for m, per in verdict.intervals.items()}


def write(verdict: Verdict, folder: Path) -> Path:
    """The report on disk: `report.md` (every table), `tables/` (md, csv, json), `plots/` (png),
    `metrics.json` (the flat metrics and `gate_passed`), `evaluation.json`, `summaries.json` (every method, with intervals),
    `intervals.json`, `gate_report.json`."""
    folder = Path(folder)
    tables_ = tables(verdict)
    write_tables(tables_, folder / "tables")
    plots_of(verdict, tables_, folder / "plots")
    atomic_write_text(folder / "report.md", "\n".join(t.to_markdown() for t in tables_), fsync=False)
    docs = {
        "metrics.json": {"gate_passed": verdict.passed, **metrics(verdict)},  # `dvc metrics show`
        "evaluation.json": evaluation_dict(verdict.evaluation),
        "summaries.json": {m: s.as_dict() for m, s in verdict.summaries.items()},
        "intervals.json": intervals_dict(verdict),
        "gate_report.json": verdict.gate.as_dict(),
    }
    for name, doc in docs.items():
        atomic_write_json(folder / name, doc, fsync=False)
    return folder


def render(verdict: Verdict, *, gate: bool = True) -> str:
    """What `r2m evaluate` / `r2m gate` print: every table, then the gate's lines."""
    text = "\n".join(t.to_markdown() for t in tables(verdict)[1:])
    if gate:
        text += "\n" + "\n".join(gate_lines(verdict.gate.as_dict()))
    return text


__all__ = ["gate_lines", "gate_markdown", "metrics", "render", "summary_metrics", "tables", "write"]
