"""`r2m demo-data`: build the embedded benchmark (issue 3)."""

from r2m.cli import command, not_implemented


@command("demo-data")
def demo_data() -> None:
    """Build the embedded benchmark of generator datasets from bundled real photographs."""
    not_implemented("demo-data")
