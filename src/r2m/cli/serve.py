"""`r2m serve`: the ONNX Runtime HTTP server (issue 6)."""

from r2m.cli import command, not_implemented


@command("serve")
def serve() -> None:
    """Serve the newest published detector over HTTP with ONNX Runtime."""
    not_implemented("serve")
