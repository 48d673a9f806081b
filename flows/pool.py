"""Training on a Prefect work pool: the deployment `r2m-train-specialist` and the loop's side of it.

With `flow.work_pool` set in params.yaml, the flows of `flows/continual.py` hand each new
dataset's fine-tuning to the deployment `flow.train_deployment` (`run_deployment`), which runs
on that work pool: a backlog of datasets trains in parallel, one flow run per worker (one worker
per GPU, or the pool's concurrency limit). The loop's own steps do not change (`r2m.pipeline.loop
.run_steps`): it waits for the training of each dataset in onboarding order, fetches the
checkpoint from the MLflow run the worker logged (`r2m.pipeline.pool`), checks and registers the
specialist, then re-merges, gates and releases, one step at a time, before the next.

Set up (docs/usage.md, "Training on a work pool"):

    prefect work-pool create r2m-train --type process   # or --type docker / kubernetes
    python -m flows.pool deploy --pool r2m-train          # registers r2m-train-specialist/pool
    prefect worker start --pool r2m-train --limit 1       # one per GPU (CUDA_VISIBLE_DEVICES=i)

Each worker runs the flow in the project folder it was started from (a process pool) or in
the image of `deploy/` (docker/kubernetes); it needs the same data under its data root (DVC)
and the shared tracking server (MLFLOW_TRACKING_URI). Nothing is handed over on local disk:
the checkpoint goes to MLflow as the training run's artifact.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.runtime import flow_run as current_flow_run

from r2m.config import Params
from r2m.data import GeneratorDataset
from r2m.errors import ConfigError, TrainingError
from r2m.pipeline import pool
from r2m.tracking import mlflow_store

TRAIN_FLOW = "r2m-train-specialist"
ENTRYPOINT = "flows/pool.py:train_specialist"
IN_FLIGHT = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]
POLL_S = 2.0


# ------------------------------------------------------------------ the deployment's flow (worker)


@flow(name=TRAIN_FLOW, flow_run_name="train-{generator}", log_prints=True)
def train_specialist(generator: str, data_hash: str, theta0_sha256: str, config: dict,
                     params_file: str | None = None) -> str:
    """Fine-tune the specialist of `generator` on this worker and log it to MLflow (returns the
    run id). `config`: the loop's model/pretrain/train/data sections; paths are the worker's."""
    params = pool.worker_params(config, params_file)
    run_id = pool.train_and_log(params, generator, data_hash, theta0_sha256,
                                flow_run_id=str(current_flow_run.id or ""))
    get_run_logger().info("specialist %s trained: MLflow run %s", generator, run_id)
    return run_id


def deployment_names(params: Params) -> tuple[str, str]:
    """(flow name, deployment name) of `flow.train_deployment`."""
    flow_name, _, name = params.flow.train_deployment.partition("/")
    if flow_name != TRAIN_FLOW or not name:
        raise ConfigError(f"flow.train_deployment '{params.flow.train_deployment}': expected "
                          f"'{TRAIN_FLOW}/<deployment name>'")
    return flow_name, name


def deploy(params: Params, *, pool_name: str | None = None, source: Path | str | None = None,
           image: str | None = None) -> UUID:
    """Register the training deployment on the work pool (`flow.work_pool`, or `pool_name`).

    A process pool: `source` is the folder holding `flows/` that workers run from (default: this
    checkout); a worker runs the flow there, with its own environment (PYTHONPATH,
    R2M_PROJECT_ROOT, MLFLOW_TRACKING_URI). A docker or kubernetes pool: `image` is an image
    that holds the project (flows/ at its working directory, r2m installed), built and pushed
    beforehand; the flow's entrypoint is `flows/pool.py:train_specialist` inside it."""
    pool_name = pool_name or params.flow.work_pool
    if not pool_name:
        raise ConfigError("flow.work_pool is null: name the Prefect work pool in params.yaml or with --pool")
    _, name = deployment_names(params)
    options = dict(name=name, work_pool_name=pool_name, build=False, push=False, print_next_steps=False,
                   description="Fine-tune one specialist on a worker and log it to MLflow (r2m work-pool training).",
                   tags=["r2m"])
    if image:
        return train_specialist.deploy(image=image, **options)
    source = str(Path(source or Path(__file__).resolve().parents[1]).resolve())
    return train_specialist.from_source(source=source, entrypoint=ENTRYPOINT).deploy(**options)


# ----------------------------------------------------------------------- the loop's side (tasks)


def _deployment_id(client, params: Params) -> UUID:
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(params.flow.train_deployment).id
    except ObjectNotFound:
        raise ConfigError(f"flow.train_deployment '{params.flow.train_deployment}' is not registered on the "
                          f"Prefect server: run `python -m flows.pool deploy` (work pool {params.flow.work_pool})") from None


def in_flight(params: Params, dataset: GeneratorDataset) -> UUID | None:
    """A training run of this dataset's content still scheduled or running (e.g. dispatched by a
    loop run that was killed): waited for instead of dispatching a second one."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[_deployment_id(client, params)])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=IN_FLIGHT))),
        )
    return next((r.id for r in runs if r.parameters.get("generator") == dataset.name
                 and r.parameters.get("data_hash") == dataset.data_hash), None)


def dispatch(params: Params, dataset: GeneratorDataset, theta0_sha256: str) -> UUID:
    """Start one training run on the pool (returns at once)."""
    with get_client(sync_client=True) as client:
        _deployment_id(client, params)  # a missing deployment: one line saying what to run
    run = run_deployment(name=params.flow.train_deployment, parameters=pool.request(dataset, params, theta0_sha256),
                         timeout=0, flow_run_name=f"train-{dataset.name}", tags=["r2m"])
    return run.id


def wait(params: Params, flow_run_id: UUID, dataset: GeneratorDataset):
    """Block until the training run ends; its final state."""
    deadline = time.monotonic() + params.flow.train_timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run.state
            if time.monotonic() > deadline:
                raise TrainingError(f"training of {dataset.name} on the work pool (flow run {flow_run_id}) "
                                    f"did not finish within flow.train_timeout_s = {params.flow.train_timeout_s} s")
            time.sleep(POLL_S)


def trained_run(params: Params, dataset: GeneratorDataset, theta0_sha256: str, flow_run_id: str | None) -> str:
    """The MLflow run of this dataset's training on the pool, once it has finished: found at once
    when it is done already, else the flow run `flow_run_id` (or one in flight, or a new one) is
    waited for. A flow run that had failed before (this is a retry) is started again."""
    client = mlflow_store.client(params)
    run_id = pool.find_trained_run(client, params, dataset.name, dataset.data_hash, theta0_sha256)
    if run_id is not None:
        return run_id
    flow_run_id = flow_run_id or in_flight(params, dataset) or dispatch(params, dataset, theta0_sha256)
    with get_client(sync_client=True) as prefect:
        state = prefect.read_flow_run(UUID(str(flow_run_id))).state
    if state is not None and state.is_final() and not state.is_completed():
        flow_run_id = in_flight(params, dataset) or dispatch(params, dataset, theta0_sha256)
    get_run_logger().info("waiting for the training of %s on work pool %s (flow run %s)", dataset.name,
                          params.flow.work_pool, flow_run_id)
    state = wait(params, UUID(str(flow_run_id)), dataset)
    if not state.is_completed():
        message = f"training of {dataset.name} on the work pool ended {state.type.value}: {state.message}"
        if state.is_failed():
            raise TrainingError(message)  # the worker's own error (data, θ0, recipe): not retried
        raise RuntimeError(message)  # crashed or cancelled: transient, retried
    run_id = pool.find_trained_run(client, params, dataset.name, dataset.data_hash, theta0_sha256)
    if run_id is None:
        raise TrainingError(f"training of {dataset.name} (flow run {flow_run_id}) completed but logged no "
                            "finished training run to this MLflow tracking server")
    return run_id


def start_training(params: Params, dataset: GeneratorDataset, theta0_sha256: str) -> str | None:
    """Hand one dataset's fine-tuning to the pool, unless it is trained or training already;
    the flow run id (None: trained already)."""
    if pool.find_trained_run(mlflow_store.client(params), params, dataset.name, dataset.data_hash, theta0_sha256):
        return None
    return str(in_flight(params, dataset) or dispatch(params, dataset, theta0_sha256))


# --------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.pool",
        description="Register the r2m training deployment on a Prefect work pool (docs/usage.md, 'Training on a work pool').")
    sub = parser.add_subparsers(dest="command", required=True)
    dep = sub.add_parser("deploy", help="register flow.train_deployment on the work pool")
    dep.add_argument("--params", default=None, help="params.yaml to read (default: the project's)")
    dep.add_argument("--pool", default=None, help="the work pool (default: flow.work_pool of params.yaml)")
    dep.add_argument("--source", default=None,
                     help="process pool: the folder workers run flows/ from (default: this checkout)")
    dep.add_argument("--image", default=None,
                     help="docker/kubernetes pool: the image holding the project (built and pushed beforehand)")
    args = parser.parse_args(argv)

    from r2m.config import load_params

    params = load_params(args.params)
    deployment_id = deploy(params, pool_name=args.pool, source=args.source, image=args.image)
    print(f"deployment {params.flow.train_deployment} ({deployment_id}) on work pool "
          f"{args.pool or params.flow.work_pool}; start workers with: "
          f"prefect worker start --pool {args.pool or params.flow.work_pool} --limit 1")


if __name__ == "__main__":
    main()
