"""The gate: may a merged candidate replace the champion? (SPEC section 6)

Rules, thresholds from `params.yaml` `gate:`
- `max_drop`:        DROP_max ≤ gate.max_drop (when specialists were scored on seen tasks);
- `min_gain_macro`:  macro GAIN ≥ gate.min_gain_macro (only when unseen sets exist);
- `max_regression`:  AUC(champion) − AUC(θ*) ≤ gate.max_regression on every shared task
                     (only when a champion exists);
- `min_auc`:         AUC(θ*) ≥ gate.min_auc on every seen task.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from r2m.config import GateConfig
from r2m.errors import GateFailed
from r2m.evaluation.protocol import ProtocolSummary


@dataclass(frozen=True)
class GateRule:
    """One rule: the measured value, its threshold, whether it holds, and where it is worst."""

    name: str
    value: float
    threshold: float
    comparison: str  # "<=" or ">="
    passed: bool
    worst_task: str | None = None

    def describe(self) -> str:
        """e.g. 'max_drop: 0.1300 on fs-cdf > 0.1' (a failure shows the violated relation)."""
        where = f" on {self.worst_task}" if self.worst_task else ""
        relation = self.comparison if self.passed else {"<=": ">", ">=": "<"}[self.comparison]
        return f"{self.name}: {self.value:.4f}{where} {relation} {self.threshold:g}"


@dataclass(frozen=True)
class GateReport:
    """The verdict, every number behind it, and the failing rules named in `reason`."""

    passed: bool
    candidate: str
    rules: tuple[GateRule, ...]
    skipped: tuple[str, ...]  # rules that did not apply (no unseen sets, no champion...)
    summary: ProtocolSummary

    @property
    def failed_rules(self) -> list[GateRule]:
        return [r for r in self.rules if not r.passed]

    @property
    def reason(self) -> str:
        """One line: 'passed' or the failing rules with their numbers."""
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
            "rules": [asdict(r) for r in self.rules],
            "skipped": list(self.skipped),
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
    if summary.drop:
        task, value = _worst(summary.drop, highest=True)  # DROP_max
        rules.append(GateRule("max_drop", value, gate.max_drop, "<=", value <= gate.max_drop, task))
    else:
        skipped.append("max_drop: no specialist scored on a seen task")
    if summary.gain_macro is not None:
        value = summary.gain_macro
        rules.append(
            GateRule("min_gain_macro", value, gate.min_gain_macro, ">=", value >= gate.min_gain_macro)
        )
    else:
        skipped.append("min_gain_macro: no unseen set (or no specialist) scored")
    if summary.regression:
        task, delta = _worst(summary.regression, highest=False)
        value = -delta  # how much the candidate lost against the champion
        rules.append(
            GateRule("max_regression", value, gate.max_regression, "<=", value <= gate.max_regression, task)
        )
    else:
        skipped.append("max_regression: no champion")
    if summary.seen_auc:
        task, value = _worst(summary.seen_auc, highest=False)
        rules.append(GateRule("min_auc", value, gate.min_auc, ">=", value >= gate.min_auc, task))
    else:
        skipped.append("min_auc: no seen task scored")
    return GateReport(
        passed=bool(rules) and all(r.passed for r in rules),
        candidate=summary.candidate,
        rules=tuple(rules),
        skipped=tuple(skipped),
        summary=summary,
    )
