"""`r2m serve`: the ONNX Runtime HTTP server (issue 6)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from r2m.cli import command


@command("serve")
def serve(
    repository: Optional[Path] = typer.Option(
        None, "--repository", help="Model repository (default: paths.model_repository)."),
    host: Optional[str] = typer.Option(None, "--host", help="Bind address (default: serve.host = 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default: serve.port)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads (default: serve.threads)."),
    params_file: Optional[Path] = typer.Option(None, "--params", help="params.yaml to read (default: the project's)."),
) -> None:
    """Serve the published detector config.pbtxt names (the champion) over HTTP with ONNX Runtime; hot-reloads.

    GET /healthz, POST /v1/detect (multipart `file`), POST /v2/models/r2m_detector/infer (Open
    Inference Protocol), GET /v2/models/r2m_detector. Binds to loopback unless --host says otherwise.
    """
    from r2m.config import load_params
    from r2m.serving.server import run_server

    run_server(load_params(params_file), repository, host, port, threads)
