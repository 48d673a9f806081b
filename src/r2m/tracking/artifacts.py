"""Registry references are MLflow artifact URIs; this turns them into local files (docs/method.md, "Registry and release").

A registered checkpoint (a specialist or a detector version) is referenced by the tag
`artifact_uri` = `runs:/<run id>/checkpoint/<file>.safetensors` (older versions: the version's
`source` folder), never by a path on one machine. `resolve_checkpoint` finds the file:

- a local store (SQLite + artifact folder): the run's own artifact folder, which after
  `mlflow_store.relocate_store` is inside *this* project even when the project was moved or
  copied;
- any other store (a tracking server: docs/usage.md, "Running r2m for a team"): downloaded once into
  `<artifacts>/cache/checkpoints/<sha256[:16]>/` and checked against the version's `sha256`.

`resolve_file` does the same for any one file a tag references by URI (a detector version's
`onnx_uri`, checked against `onnx_sha256`): a second machine gets the champion's ONNX file from
the tracking server and publishes it into its own model repository.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from r2m.checkpoint import file_sha256, read_meta, sidecar_path
from r2m.config import Params
from r2m.errors import RegistryError
from r2m.tracking.registry import CHECKPOINT_ARTIFACTS

ARTIFACT_URI_TAG = "artifact_uri"
CACHE = Path("cache") / "checkpoints"
FILE_CACHE = Path("cache") / "files"


def checkpoint_uri(run_id: str, filename: str, artifact_path: str = CHECKPOINT_ARTIFACTS) -> str:
    """The MLflow URI of a checkpoint logged by `runs.log_checkpoint`."""
    return f"runs:/{run_id}/{artifact_path}/{filename}"


def parse_runs_uri(uri: str) -> tuple[str, str]:
    """`runs:/<run id>/<path>` -> (run id, path)."""
    if not uri.startswith("runs:/"):
        raise RegistryError(f"'{uri}': not a runs:/ artifact URI")
    run_id, _, rel = uri.removeprefix("runs:/").strip("/").partition("/")
    if not run_id or not rel:
        raise RegistryError(f"'{uri}': expected runs:/<run id>/<artifact path>")
    return run_id, rel


def local_artifact_dir(artifact_uri: str) -> Path | None:
    """The folder of a run's artifacts when the store keeps them on this machine."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and artifact_uri.startswith("/"):
        return Path(artifact_uri)
    return None


def version_uri(client, mv) -> str:
    """The checkpoint URI of a model version: its `artifact_uri` tag, else the safetensors file
    in its `source` folder (versions registered before the tag existed)."""
    uri = mv.tags.get(ARTIFACT_URI_TAG)
    if uri:
        return uri
    source = mv.source or ""
    if not source.startswith("runs:/"):
        raise RegistryError(f"{mv.name} v{mv.version}: source '{source}' is not a runs:/ URI")
    run_id, folder = parse_runs_uri(source)
    files = [a.path for a in client.list_artifacts(run_id, folder) if a.path.endswith(".safetensors")]
    if len(files) != 1:
        raise RegistryError(f"{mv.name} v{mv.version}: expected one .safetensors file in {source}, found {files}")
    return f"runs:/{run_id}/{files[0]}"


def _matches(path: Path, sha256: str | None) -> bool:
    if not path.is_file():
        return False
    return not sha256 or read_meta(path).get("sha256") == sha256


def resolve_checkpoint(params: Params, client, mv) -> Path:
    """The local safetensors file (with its sidecar) of model version `mv`."""
    return resolve_checkpoint_uri(params, client, version_uri(client, mv), mv.tags.get("sha256") or None,
                                  f"{mv.name} v{mv.version}")


def resolve_checkpoint_uri(params: Params, client, uri: str, sha: str | None, label: str) -> Path:
    """The local safetensors file (with its sidecar) at `runs:/<run>/<path>`: the run's own
    artifact folder for a local store, else downloaded once into `<artifacts>/cache/`; checked
    against the sidecar's (and the file's) `sha` when given. `label` names it in errors."""
    run_id, rel = parse_runs_uri(uri)
    local = local_artifact_dir(client.get_run(run_id).info.artifact_uri)
    if local is not None:
        path = local / rel
        if _matches(path, sha):
            return path
        raise RegistryError(f"{label}: {uri} is not in this project's artifact store ({path} "
                            + ("missing" if not path.is_file() else "has another sha256") + ")")
    cache = params.path("artifacts") / CACHE / (sha[:16] if sha else run_id)
    path = cache / Path(rel).name
    if _matches(path, sha) and (not sha or file_sha256(path) == sha):
        return path
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".download-"))
    try:
        folder = str(Path(rel).parent)
        got = Path(client.download_artifacts(run_id, folder, str(tmp)))
        src = got / Path(rel).name
        if not src.is_file():
            raise RegistryError(f"{label}: {uri} has no file {Path(rel).name}")
        if sha and file_sha256(src) != sha:
            raise RegistryError(f"{label}: {uri} does not match the registered sha256 {sha[:12]}")
        if sidecar_path(src).is_file():
            os.replace(sidecar_path(src), sidecar_path(path))
        os.replace(src, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def resolve_file(params: Params, client, uri: str, sha256: str | None = None) -> Path:
    """The local copy of one artifact file `runs:/<run>/<path>` (e.g. a detector's `onnx_uri`):
    the run's own artifact folder for a local store, else downloaded once into
    `<artifacts>/cache/files/<sha256[:16]>/`; checked against `sha256` when given."""
    run_id, rel = parse_runs_uri(uri)
    local = local_artifact_dir(client.get_run(run_id).info.artifact_uri)
    if local is not None:
        path = local / rel
        if not path.is_file():
            raise RegistryError(f"{uri}: not in this project's artifact store ({path} missing)")
    else:
        cache = params.path("artifacts") / FILE_CACHE / (sha256[:16] if sha256 else run_id)
        path = cache / Path(rel).name
        if not (path.is_file() and (not sha256 or file_sha256(path) == sha256)):
            cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".download-"))
            try:
                got = Path(client.download_artifacts(run_id, rel, str(tmp)))
                if not got.is_file():
                    raise RegistryError(f"{uri}: not a file on the tracking server")
                os.replace(got, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    if sha256 and file_sha256(path) != sha256:
        raise RegistryError(f"{uri}: {path} does not match the registered sha256 {sha256[:12]}")
    return path
