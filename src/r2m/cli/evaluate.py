"""`r2m evaluate` and `r2m gate`: protocol tables, DROP/GAIN and the gate (issue 5)."""

from r2m.cli import command, not_implemented


@command("evaluate")
def evaluate() -> None:
    """Score a checkpoint on generator datasets: per-task AUC, EER, AP (+ DROP/GAIN)."""
    not_implemented("evaluate")
