"""Where MLflow keeps runs and models (docs/usage.md, "Comparing runs (MLflow)", "Reliability").

Embedded default: a SQLite store `sqlite:///mlflow.db` and the artifact folder `mlartifacts/`,
both at the project root (`params.tracking_uri`, `params.path("mlflow_artifacts")`);
`MLFLOW_TRACKING_URI` points at a real server instead, which then chooses artifact locations.
Browse with:

    mlflow ui --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts

MLflow writes absolute artifact locations into a SQLite store (each experiment's
`artifact_location`, each run's `artifact_uri`). A project moved or copied with its store and
its artifact folder would then read and write the *original* folder (or fail when it is gone);
`relocate_store` rewrites those locations to this project's artifact folder before the store
is opened (only where the artifacts are actually here), so the project is relocatable. MLflow's
own `Default` experiment (id 0, created with the store) gets its location from the working folder
of whoever created the store (`<cwd>/mlruns/0`); r2m points it at `<artifact root>/0` whenever the
store is opened, so it never names another folder either.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
from pathlib import Path
from urllib.parse import unquote, urlparse

from r2m.config import Params

EXPERIMENT_SPECIALISTS = "r2m-specialists"  # one run per specialist training
EXPERIMENT_MERGES = "r2m-merges"  # one run per merge + evaluation + gate
DEFAULT_EXPERIMENT_ID = 0  # MLflow's `Default` experiment, created with every store


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
    new_store = False
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        new_store = not db.is_file()
        relocate_store(params)
    # MLflow also exports these to MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI, which r2m reads as
    # the user's override: left there, the next project loaded in this process (or any child
    # process) would silently use this project's store. Keep the environment as it was.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    mlflow_client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if new_store:  # MLflow creates the store (and `Default`, at <cwd>/mlruns/0) on first use: do it now, then fix it
        mlflow_client.search_experiments(max_results=1)
        relocate_store(params)
    return mlflow_client


def artifact_root(params: Params) -> Path:
    """The local artifact folder (`mlartifacts/` at the project root by default)."""
    return params.path("mlflow_artifacts").resolve()


def experiment_folder(name: str) -> str:
    """The folder of experiment `name` under the artifact root."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _local(location: str) -> Path | None:
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and location.startswith("/"):
        return Path(location)
    return None


def relocate_store(params: Params) -> list[tuple[str, str]]:
    """Point a moved or copied SQLite store at this project's artifact folder.

    For each r2m experiment whose artifact location is `<old root>/<its folder>` with
    `<old root>` not this project's artifact root, while `<artifact root>/<its folder>` exists
    here (the artifacts came along), rewrite the `<old root>` prefix of every experiment
    location and run artifact URI to this root; MLflow's `Default` experiment is pointed at
    `<artifact root>/0` (`_relocate_default`). Returns the (old, new) prefixes rewritten.
    """
    db = Path(params.tracking_uri.removeprefix("sqlite:///"))
    if not db.is_file():
        return []
    root = artifact_root(params)
    names = (EXPERIMENT_SPECIALISTS, EXPERIMENT_MERGES)
    con = sqlite3.connect(str(db), timeout=60)
    try:
        try:
            rows = con.execute("SELECT name, artifact_location FROM experiments WHERE name IN (?, ?)", names).fetchall()
        except sqlite3.OperationalError:  # an empty file: MLflow has not created its tables yet
            return []
        moves: set[tuple[Path, Path]] = set()
        for name, location in rows:
            path = _local(location or "")
            if path is None or path.name != experiment_folder(name) or path.parent == root:
                continue
            if (root / path.name).is_dir():
                moves.add((path.parent, root))
        done = []
        for old, new in sorted(moves):
            for o, n in ((old.as_uri(), new.as_uri()), (str(old), str(new))):
                prefix = o + "/"
                for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
                    con.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                                f"WHERE substr({column}, 1, ?) = ?", (n, len(o) + 1, len(prefix), prefix))
            done.append((str(old), str(new)))
        done += _relocate_default(con, root)
        con.commit()
        return done
    finally:
        con.close()


def _relocate_default(con: sqlite3.Connection, root: Path) -> list[tuple[str, str]]:
    """Point MLflow's `Default` experiment at `<root>/0` when its location is a local folder
    elsewhere (where the store was created, or where the project was before a move); its runs'
    artifact URIs follow when their artifacts came along (`<root>/0` exists here)."""
    row = con.execute("SELECT artifact_location FROM experiments WHERE experiment_id = ?",
                      (DEFAULT_EXPERIMENT_ID,)).fetchone()
    old = _local(row[0] or "") if row else None
    new = root / str(DEFAULT_EXPERIMENT_ID)
    if old is None or old == new:
        return []
    con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?", (new.as_uri(), DEFAULT_EXPERIMENT_ID))
    if new.is_dir():
        for o, n in ((old.as_uri(), new.as_uri()), (str(old), str(new))):
            prefix = o + "/"
            con.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) WHERE experiment_id = ? "
                        "AND substr(artifact_uri, 1, ?) = ?", (n, len(o) + 1, DEFAULT_EXPERIMENT_ID, len(prefix), prefix))
    return [(str(old), str(new))]


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
        folder = artifact_root(params) / experiment_folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        location = folder.as_uri()
    return c.create_experiment(name, artifact_location=location)


def ui_command(params: Params) -> str:
    """The command that opens this store in the MLflow UI."""
    return (
        f"mlflow ui --backend-store-uri {params.tracking_uri} "
        f"--default-artifact-root {artifact_root(params)}"
    )
