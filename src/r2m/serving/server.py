"""Run the HTTP server with uvicorn: one process, ONNX Runtime threads from `serve.threads` (at most the usable CPUs)."""

from __future__ import annotations

import logging
from pathlib import Path

from r2m.config import Params
from r2m.errors import ConfigError


def run_server(params: Params, repository: Path | str | None = None, host: str | None = None,
               port: int | None = None, threads: int | None = None, log_level: str = "info") -> None:
    """Serve `<repository>/r2m_detector/` (default `paths.model_repository`) until interrupted."""
    import uvicorn

    from r2m.serving.app import create_app

    repository = Path(repository) if repository else params.path("model_repository")
    if not repository.is_dir():
        raise ConfigError(f"model repository '{repository}' is not a folder (publish a model with `r2m publish`)")
    updates = {k: v for k, v in {"host": host, "port": port, "threads": threads}.items() if v is not None}
    cfg = params.serve.model_copy(update=updates)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(repository, cfg, params.data)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=log_level, access_log=log_level == "debug")
