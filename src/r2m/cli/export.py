"""`r2m export` / `r2m publish`: ONNX export with parity and publishing (issue 6)."""

from r2m.cli import command, not_implemented


@command("export")
def export() -> None:
    """Export a merged checkpoint to ONNX and check ONNX Runtime parity against torch."""
    not_implemented("export")
