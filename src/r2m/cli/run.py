"""`r2m run`: the whole continual loop once (issue 7)."""

from r2m.cli import command, not_implemented


@command("run")
def run() -> None:
    """Run the continual loop once: onboard new generators, re-merge, gate, export, promote."""
    not_implemented("run")
