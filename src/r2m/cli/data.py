"""`r2m validate` / `r2m import-deepfakebench`: the data contract (issue 2)."""

from r2m.cli import command, not_implemented


@command("validate")
def validate() -> None:
    """Validate generator datasets under the data root against the data contract."""
    not_implemented("validate")
