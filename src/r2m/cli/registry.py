"""`r2m promote` / `r2m rollback`: move the detector's MLflow aliases (issue 5)."""

from r2m.cli import command, not_implemented


@command("promote")
def promote() -> None:
    """Move `champion` to a detector version (the old champion becomes `previous-champion`)."""
    not_implemented("promote")


@command("rollback")
def rollback() -> None:
    """Move `champion` back to `previous-champion`."""
    not_implemented("rollback")
