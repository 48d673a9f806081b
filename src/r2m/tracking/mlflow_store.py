"""Where MLflow keeps runs and models (SPEC section 7).

Embedded default: a SQLite store `sqlite:///mlflow.db` and the artifact folder `mlartifacts/`,
both at the project root (`params.tracking_uri`, `params.path("mlflow_artifacts")`);
`MLFLOW_TRACKING_URI` points at a real server instead, which then chooses artifact locations.
Browse with:

    mlflow ui --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from r2m.config import Params

EXPERIMENT_SPECIALISTS = "r2m-specialists"  # one run per specialist training
EXPERIMENT_MERGES = "r2m-merges"  # one run per merge + evaluation + gate


def _quiet_mlflow() -> None:
    """MLflow logs every schema migration at INFO on a fresh store; keep the console clean."""
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def is_local(uri: str) -> bool:
    """A store on this machine (sqlite file or folder), whose artifacts we place ourselves."""
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def client(params: Params):
    """An `MlflowClient` on the project's tracking store; also sets the global tracking and
    registry URIs so `mlflow.*` calls go to the same place."""
    import mlflow
    from mlflow import MlflowClient

    _quiet_mlflow()  # after the import: importing mlflow sets its loggers to INFO

    uri = params.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def artifact_root(params: Params) -> Path:
    """The local artifact folder (`mlartifacts/` at the project root by default)."""
    return params.path("mlflow_artifacts").resolve()


def experiment_id(params: Params, name: str, mlflow_client=None) -> str:
    """The experiment `name`, created on first use with its artifacts under `mlartifacts/<name>`
    for a local store (a remote server keeps its own default)."""
    c = mlflow_client or client(params)
    found = c.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            c.restore_experiment(found.experiment_id)
        return found.experiment_id
    location = None
    if is_local(params.tracking_uri):
        folder = artifact_root(params) / re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        folder.mkdir(parents=True, exist_ok=True)
        location = folder.as_uri()
    return c.create_experiment(name, artifact_location=location)


def ui_command(params: Params) -> str:
    """The command that opens this store in the MLflow UI."""
    return (
        f"mlflow ui --backend-store-uri {params.tracking_uri} "
        f"--default-artifact-root {artifact_root(params)}"
    )
