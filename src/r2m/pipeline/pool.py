"""Specialist training done elsewhere (a Prefect work-pool worker), handed back through MLflow.

With `flow.work_pool` set, the flows (`flows/pool.py`) hand each new dataset's fine-tuning to a
deployment on a work pool. The MLflow half of that lives here, without Prefect:

- `train_and_log` runs on the worker: it validates the dataset under *its* data root, checks that
  the content, θ0 and recipe are the ones the loop asked for (a worker with other data or other
  weights fails with one line naming what differs), trains into a temporary folder and logs a
  finished run in `r2m-specialists` whose artifact is the checkpoint (safetensors + sidecar). Its
  tags carry the identity (generator, data hash, θ0 hash, recipe) and, set last, `r2m.trained`.
  Nothing of it stays on the worker's disk: the run is the hand-over, resolvable from any
  machine that reaches the tracking server and its artifact store.
- `find_trained_run` is the loop's question "is this specialist trained?", answered by the
  tracking server (so a loop restarted after a crash, or a second dispatch, finds a training
  that finished and does not train again); `fetch_trained` gets its checkpoint here (a local
  store: the run's own folder; a server: downloaded once into `<artifacts>/cache/checkpoints/`,
  checked against its sha256), for the checks and the re-merge, and
  `onboard_specialist(..., trained=...)` registers the version from that run (the version's
  `artifact_uri` is the run's artifact, never a path on one machine).
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from pathlib import Path
from typing import Mapping

from r2m.checkpoint import file_sha256
from r2m.config import Params
from r2m.data import GeneratorDataset, validate_dataset
from r2m.errors import ConfigError, DatasetError
from r2m.models import ensure_pretrained
from r2m.pipeline.specialists import checkpoint_path
from r2m.tracking import mlflow_store, runs
from r2m.tracking.artifacts import checkpoint_uri, resolve_checkpoint_uri
from r2m.tracking.mlflow_store import EXPERIMENT_SPECIALISTS, experiment_id
from r2m.tracking.registry import tag_value
from r2m.training.specialist import recipe, train_specialist

TRAINED_TAG = "r2m.trained"  # set last on a worker's training run: the run is complete
RECIPE_TAG = "recipe"
FILE_TAG = "r2m.checkpoint_file"
FLOW_RUN_TAG = "r2m.prefect_flow_run"
HOST_TAG = "r2m.trained_on"
TRAIN_SPAN_TAG = "r2m.train_span"  # [start, end, CPU s] of the training itself (Unix seconds, the worker's clock)

# params.yaml sections that decide what a worker trains; the loop sends them with each request,
# so a worker trains exactly the loop's specialist (its own params.yaml gives only the paths)
TRAINING_SECTIONS = ("model", "pretrain", "train", "data")


def training_config(params: Params) -> dict:
    """The sections of `params` a worker must train with (JSON, a deployment parameter)."""
    dumped = params.model_dump(mode="json")
    return {name: dumped[name] for name in TRAINING_SECTIONS}


def worker_params(config: Mapping, params_file: str | None = None) -> Params:
    """The worker's params: its own paths (params.yaml, env), the loop's training sections."""
    from r2m.config import load_params

    unknown = sorted(set(config) - set(TRAINING_SECTIONS))
    if unknown:
        raise ConfigError(f"training request: unexpected section '{unknown[0]}' (expected {list(TRAINING_SECTIONS)})")
    return load_params(params_file, **dict(config))


def _identity_filter(generator: str, data_hash: str, theta0_sha256: str) -> str:
    return (f"tags.`{TRAINED_TAG}` = 'true' and tags.generator = '{generator}' "
            f"and tags.data_hash = '{data_hash}' and tags.theta0_sha256 = '{theta0_sha256}' "
            "and attributes.status = 'FINISHED'")


def find_trained_run(client, params: Params, generator: str, data_hash: str, theta0_sha256: str) -> str | None:
    """The id of a finished training run with this identity (and this recipe), if any (the oldest)."""
    found = client.search_runs(
        [experiment_id(params, EXPERIMENT_SPECIALISTS, client)],
        filter_string=_identity_filter(generator, data_hash, theta0_sha256),
        order_by=["attributes.start_time ASC"],
    )
    want = tag_value(recipe(params))
    return next((r.info.run_id for r in found if r.data.tags.get(RECIPE_TAG) == want), None)


def fetch_trained(params: Params, client, run_id: str) -> Path:
    """The checkpoint of training run `run_id` as a local file (with its sidecar), checked
    against the sha256 the worker recorded."""
    tags = client.get_run(run_id).data.tags
    if tags.get(TRAINED_TAG) != "true" or not tags.get(FILE_TAG):
        raise DatasetError(Path(tags.get("generator", run_id)),
                           f"MLflow run {run_id} is not a finished r2m training run (no '{TRAINED_TAG}' tag)")
    return resolve_checkpoint_uri(params, client, checkpoint_uri(run_id, tags[FILE_TAG]), tags.get("sha256") or None,
                                  f"training run {run_id} of {tags.get('generator')}")


def train_and_log(
    params: Params,
    generator: str,
    data_hash: str,
    theta0_sha256: str,
    *,
    flow_run_id: str | None = None,
    progress: bool = False,
) -> str:
    """On a worker: train the specialist of `generator` and log it as a finished run; returns
    the run id. A finished run with the same identity is returned as it is (no second training)."""
    client = mlflow_store.client(params)
    root = params.path("data_root")
    dataset = validate_dataset(root / generator, root, params.data)
    if dataset.data_hash != data_hash:
        raise DatasetError(dataset.root, f"content hash {dataset.data_hash[:12]} on this worker, the loop asked for "
                           f"{data_hash[:12]}: the worker's data root is not the loop's (dvc pull?)")
    pretrained = ensure_pretrained(params, progress=progress)
    theta0 = file_sha256(pretrained)
    if theta0 != theta0_sha256:
        raise ConfigError(f"{pretrained}: θ0 sha256 {theta0[:12]} on this worker, the loop's is "
                          f"{theta0_sha256[:12]} (other θ0 weights or library versions)")
    done = find_trained_run(client, params, generator, data_hash, theta0_sha256)
    if done is not None:
        return done
    with tempfile.TemporaryDirectory(prefix="r2m-train-") as tmp:
        path = Path(tmp) / checkpoint_path(dataset, params).name
        started, cpu = time.time(), time.process_time()
        train_specialist([dataset], params, path, pretrained=pretrained, name=generator, progress=progress)
        ended, cpu = time.time(), time.process_time() - cpu
        run_id = runs.log_specialist_run(params, path, dataset=dataset, mlflow_client=client)
        extra = {RECIPE_TAG: tag_value(recipe(params)), FILE_TAG: path.name, HOST_TAG: socket.gethostname(),
                 TRAIN_SPAN_TAG: json.dumps([round(started, 3), round(ended, 3), round(cpu, 1)])}
        if flow_run_id:
            extra[FLOW_RUN_TAG] = flow_run_id
        for key, value in extra.items():
            client.set_tag(run_id, key, value)
        client.set_tag(run_id, TRAINED_TAG, "true")  # last: the run is complete
    return run_id


def request(dataset: GeneratorDataset, params: Params, theta0_sha256: str) -> dict:
    """The parameters of one training request (the deployment's flow parameters)."""
    return {"generator": dataset.name, "data_hash": dataset.data_hash, "theta0_sha256": theta0_sha256,
            "config": json.loads(json.dumps(training_config(params)))}
