"""`r2m serve`: the ONNX Runtime HTTP server (deploy/README.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from r2m.cli.app import command


@command("serve")
def serve(
    repository: Optional[Path] = typer.Option(
        None, "--repository", help="Model repository (default: paths.model_repository)."),
    host: Optional[str] = typer.Option(None, "--host", help="Bind address (default: serve.host = 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default: serve.port)."),
    threads: Optional[int] = typer.Option(
        None, "--threads", help="ONNX Runtime intra-op threads, at most the usable CPUs (default: serve.threads)."),
    params_file: Optional[Path] = typer.Option(None, "--params", help="params.yaml to read (default: the project's)."),
) -> None:
    """Serve the published detector config.pbtxt names (the champion) over HTTP with ONNX Runtime; hot-reloads.

    GET /healthz, POST /v1/detect (multipart `file`), POST /v2/models/r2m_detector/infer (Open
    Inference Protocol), GET /v2/models/r2m_detector (metadata) and .../stats (session calls per
    batch size). Concurrent requests are batched as the version's config.pbtxt says
    (max_batch_size, dynamic_batching's max_queue_delay_microseconds). Request bodies over
    serve.max_upload_bytes get 413 at once, too slow ones (serve.body_timeout_s,
    serve.min_body_bytes_per_s) 408. Binds to loopback unless --host says otherwise.
    """
    from r2m.config import load_params
    from r2m.serving.server import run_server

    run_server(load_params(params_file), repository, host, port, threads)
