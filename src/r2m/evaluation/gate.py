"""The gate: may a merged candidate replace the champion? (docs/method.md, "The gate")

Rules, thresholds from `params.yaml` `gate:`; each applies only when its inputs exist:
- `max_drop`:               DROP_max ≤ gate.max_drop on the seen tasks that have a specialist;
- `min_gain_macro`:         macro GAIN ≥ gate.min_gain_macro on the unseen sets;
- `max_regression`:         AUC(champion) − AUC(θ*) ≤ gate.max_regression on every *seen* task
                            both were scored on;
- `max_regression_unseen`:  the same on the *macro mean* of the unseen sets both were scored on
                            (judged like GAIN: one unseen set is one sample of future
                            generators); each set's own loss beyond gate.max_regression is a
                            warning in the report, not a rule;
- `min_auc`:                AUC(θ*) ≥ gate.min_auc on every seen task.

The verdict uses the point estimates. Each rule also carries the 95 % interval of its value
(paired grouped bootstrap, `r2m.evaluation.uncertainty`); a rule whose interval contains its
threshold is marked "within noise": the data cannot tell on which side of the line it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from r2m.config import GateConfig
from r2m.errors import GateFailed
from r2m.evaluation.protocol import ProtocolSummary


@dataclass(frozen=True)
class GateRule:
    """One rule: the measured value, its interval, its threshold, whether it holds, and where."""

    name: str
    value: float
    threshold: float
    comparison: str  # "<=" or ">="
    passed: bool
    worst_task: str | None = None
    low: float | None = None  # the value's 95 % interval
    high: float | None = None

    @property
    def within_noise(self) -> bool:
        """The threshold lies inside the value's interval."""
        return self.low is not None and self.high is not None and self.low <= self.threshold <= self.high

    def describe(self) -> str:
        """e.g. 'max_drop: 0.1300 [0.0950, 0.1610] on fs-cdf > 0.1 (within noise)'."""
        where = f" on {self.worst_task}" if self.worst_task else ""
        ci = f" [{self.low:.4f}, {self.high:.4f}]" if self.low is not None and self.high is not None else ""
        relation = self.comparison if self.passed else {"<=": ">", ">=": "<"}[self.comparison]
        noise = " (within noise)" if self.within_noise else ""
        return f"{self.name}: {self.value:.4f}{ci}{where} {relation} {self.threshold:g}{noise}"

    def as_dict(self) -> dict:
        return {**asdict(self), "within_noise": self.within_noise}


@dataclass(frozen=True)
class GateReport:
    """The verdict, every number behind it, the failing rules named in `reason`, and warnings."""

    passed: bool
    candidate: str
    rules: tuple[GateRule, ...]
    skipped: tuple[str, ...]  # rules that did not apply (no unseen sets, no champion...)
    summary: ProtocolSummary
    warnings: tuple[str, ...] = ()

    @property
    def failed_rules(self) -> list[GateRule]:
        return [r for r in self.rules if not r.passed]

    @property
    def within_noise(self) -> list[GateRule]:
        return [r for r in self.rules if r.within_noise]

    @property
    def reason(self) -> str:
        """One line: 'gate passed: …' or 'gate failed: ' and the failing rules with their numbers."""
        if self.passed:
            return "gate passed: " + "; ".join(r.describe() for r in self.rules)
        if not self.rules:
            return "gate failed: no rule applied (no seen task was scored)"
        return "gate failed: " + "; ".join(r.describe() for r in self.failed_rules)

    def rule(self, name: str) -> GateRule | None:
        return next((r for r in self.rules if r.name == name), None)

    def as_dict(self) -> dict:
        return {
            "passed": self.passed,
            "candidate": self.candidate,
            "reason": self.reason,
            "rules": [r.as_dict() for r in self.rules],
            "skipped": list(self.skipped),
            "warnings": list(self.warnings),
            "summary": self.summary.as_dict(),
        }

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise GateFailed(self, self.reason)


def _worst(values: dict[str, float], highest: bool) -> tuple[str, float]:
    task = (max if highest else min)(values, key=values.__getitem__)
    return task, values[task]


def check_gate(summary: ProtocolSummary, gate: GateConfig) -> GateReport:
    """Apply every rule that applies to `summary`; the candidate passes when all of them hold."""
    rules: list[GateRule] = []
    skipped: list[str] = []
    warnings: list[str] = []

    def rule(name: str, value: float, threshold: float, comparison: str, worst: str | None, interval_of: str) -> None:
        passed = value <= threshold if comparison == "<=" else value >= threshold
        low, high = summary.interval(interval_of) or (None, None)
        rules.append(GateRule(name, value, threshold, comparison, bool(passed), worst, low, high))

    if summary.drop:
        task, value = _worst(summary.drop, highest=True)  # DROP_max
        rule("max_drop", value, gate.max_drop, "<=", task, "drop_max")
    else:
        skipped.append("max_drop: no specialist scored on a seen task")
    if summary.gain_macro is not None:
        rule("min_gain_macro", summary.gain_macro, gate.min_gain_macro, ">=", None, "gain_macro")
    else:
        skipped.append("min_gain_macro: no unseen set (or no specialist) scored")
    if summary.regression:
        task, value = _worst(summary.regression, highest=True)
        rule("max_regression", value, gate.max_regression, "<=", task, "regression_max")
    else:
        skipped.append("max_regression: no champion" if summary.champion is None
                       else "max_regression: no seen task shared with the champion")
    if summary.regression_unseen_macro is not None:
        rule("max_regression_unseen", summary.regression_unseen_macro, gate.max_regression, "<=", None,
             "regression_unseen_macro")
        for j, loss in summary.unseen_regression.items():
            if loss > gate.max_regression:
                warnings.append(f"{j}: {loss:.4f} below the champion (unseen sets are judged on their "
                                f"macro mean, not one by one)")
    elif summary.champion is not None:
        skipped.append("max_regression_unseen: no unseen set shared with the champion")
    if summary.seen_auc:
        task, value = _worst(summary.seen_auc, highest=False)
        rule("min_auc", value, gate.min_auc, ">=", task, "auc_seen_min")
    else:
        skipped.append("min_auc: no seen task scored")
    return GateReport(
        passed=bool(rules) and all(r.passed for r in rules),
        candidate=summary.candidate,
        rules=tuple(rules),
        skipped=tuple(skipped),
        summary=summary,
        warnings=tuple(warnings),
    )
