"""The continual loop as Prefect flows (docs/architecture.md, "The continual loop"): thin wrappers over `r2m.pipeline`.

- `watch`   (scheduled): scan the data root → onboard every new seen dataset, one at a time:
            fine-tune → register → re-merge all accepted → gate → release. Unseen datasets
            join the evaluation suite; invalid ones are quarantined.
- `onboard` (by hand):   the same steps for named datasets (`generators=[...]`, None = all new).

The sequence of steps is defined once, in `r2m.pipeline.loop.run_steps`: `r2m run` passes it
the plain functions (`plain_steps`), these flows Prefect tasks around the same functions
(`task_steps`), so both take the same steps with the same idempotence: a specialist is keyed by
its data/θ0/recipe hashes and a candidate by its specialists, both in MLflow, so a rerun after a
crash redoes only what is missing.

With `flow.work_pool` set, the fine-tuning of the backlog is handed to the training deployment
on that Prefect work pool and runs in parallel there (`flows/pool.py`); each `onboard-<dataset>`
task waits for its own training, in onboarding order, and the re-merge → gate → release steps
stay one at a time.

Heavy steps (training, re-merge + evaluation, export) hold the global concurrency limit
`r2m-compute` (`flow.compute_slots`, 1 by default), so two flow runs never train at the same
time on a small host (training on a work pool takes no slot: the pool's workers bound it; the
check and registration of its result take one). Each flow run also holds the project lock of
`r2m run` (`r2m.pipeline.lock`, a file lock on `<artifacts>/.r2m.lock`) from before the scan to
the end, so a flow run, `r2m run` and another flow run on the same project never overlap: a
second start waits for the first and then finds its work done. Transient failures (I/O, a locked
SQLite store, a crashed pool worker) are retried `flow.retries` times; an `R2MError` (bad data, a
failed check or gate, a training that failed on the worker) is not, since the same input fails
the same way. Every run leaves table/markdown artifacts: the datasets found, the specialists,
and the gate report with links to the MLflow runs.

Run once without a server:  python -c "from flows.continual import watch; watch()"
Serve on a schedule:        python -m flows.serve
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

from flows import pool as pool_training
from r2m import pipeline
from r2m.checkpoint import file_sha256
from r2m.config import Params, load_params
from r2m.data import GeneratorDataset
from r2m.errors import DatasetError, R2MError
from r2m.evaluation import reporting
from r2m.models import ensure_pretrained
from r2m.pipeline.lock import project_lock
from r2m.pipeline.loop import LoopSteps, clean_leftovers, onboarded_check, plain_steps, run_steps
from r2m.pipeline.pool import fetch_trained
from r2m.pipeline.safety import SpecialistCheck
from r2m.pipeline.specialists import is_onboarded
from r2m.tracking import mlflow_store, registry

COMPUTE_LIMIT = "r2m-compute"  # Prefect global concurrency limit held by every heavy step
SLOT_LEASE_S = 60  # the shortest lease Prefect grants: how long a SIGKILLed run can block the next
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` listens for a local store


# ----------------------------------------------------------------------------- flow plumbing


def ensure_compute_limit(params: Params) -> None:
    """Create (or resize) the global concurrency limit `r2m-compute` on the Prefect server."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(COMPUTE_LIMIT, params.flow.compute_slots)


@contextmanager
def compute_slot() -> Iterator[None]:
    """Hold one slot of `r2m-compute` (waits while another run trains, merges or exports).

    `strict=True`: a missing limit is an error rather than a silently unlimited run. The slot is
    released when the step ends, fails or is terminated (SIGTERM, Ctrl-C); a run killed outright
    (SIGKILL) stops renewing its lease, and the server frees the slot after `SLOT_LEASE_S`.
    A lease renewal that fails once does not abort a training.
    """
    with concurrency(COMPUTE_LIMIT, occupy=1, strict=True, lease_duration=SLOT_LEASE_S,
                     raise_on_lease_renewal_failure=False):
        yield


def is_transient(task, task_run, state) -> bool:
    """Retry condition: anything but an `R2MError` may pass on a second try."""
    return not isinstance(state.result(raise_on_failure=False), R2MError)


def retry_options(params: Params) -> dict:
    """Task options from params.yaml `flow:` (retries, delay, which failures are retried)."""
    return {
        "retries": params.flow.retries,
        "retry_delay_seconds": params.flow.retry_delay_s,
        "retry_condition_fn": is_transient,
    }


# -------------------------------------------------------------------- tasks: one step each


@task(name="theta0", task_run_name="theta0", cache_policy=NO_CACHE)
def prepare_theta0(params: Params) -> Path:
    """θ0, written once: the backbone every specialist starts from."""
    with compute_slot():
        return ensure_pretrained(params)


@task(name="scan", cache_policy=NO_CACHE)
def scan_data_root(params: Params, pretrained: Path) -> pipeline.Scan:
    """Validate every dataset (quarantine the invalid ones) and find the seen ones not onboarded."""
    return pipeline.scan(params, onboarded_check(params, mlflow_store.client(params), pretrained))


def plain(params: Params, pretrained: Path) -> LoopSteps:
    """The loop's steps as `r2m run` takes them: each task below calls one of these."""
    return plain_steps(params, mlflow_store.client(params), pretrained)


@task(name="accepted-specialists", cache_policy=NO_CACHE)
def accepted_specialists(params: Params, generators: Sequence[str]) -> list[pipeline.Specialist]:
    """The newest accepted specialist of each seen generator, from the registry."""
    return pipeline.registered_specialists(params, generators)


@task(name="onboard-specialist", task_run_name="onboard-{dataset.name}", cache_policy=NO_CACHE)
def onboard_generator(
    dataset: GeneratorDataset, params: Params, pretrained: Path, accepted: Sequence[pipeline.Specialist],
    seen: Sequence[GeneratorDataset],
) -> tuple[pipeline.Specialist, SpecialistCheck | None]:
    """Fine-tune, check (own val AUC, agreement with trusted real images) and register one specialist."""
    with compute_slot():
        return plain(params, pretrained).onboard(dataset, accepted, seen)


@task(name="train-on-pool", task_run_name="train-{dataset.name}", cache_policy=NO_CACHE)
def start_pool_training(dataset: GeneratorDataset, params: Params, theta0_sha256: str) -> str | None:
    """Hand one dataset's fine-tuning to the work pool (returns at once: the flow run id, None
    when it is trained already). No compute slot: the pool's workers bound the trainings."""
    if is_onboarded(mlflow_store.client(params), dataset, params, theta0_sha256):  # named by `onboard(...)`
        return None
    return pool_training.start_training(params, dataset, theta0_sha256)


@task(name="onboard-specialist", task_run_name="onboard-{dataset.name}", cache_policy=NO_CACHE)
def onboard_from_pool(
    dataset: GeneratorDataset, params: Params, pretrained: Path, accepted: Sequence[pipeline.Specialist],
    seen: Sequence[GeneratorDataset], flow_run_id: str | None,
) -> tuple[pipeline.Specialist, SpecialistCheck | None]:
    """Wait for this dataset's training on the pool, fetch the checkpoint from its MLflow run, then
    check and register the specialist from that run (the same `onboard_specialist`)."""
    client = mlflow_store.client(params)
    theta0 = file_sha256(pretrained)
    if is_onboarded(client, dataset, params, theta0):  # registered already: nothing to train or wait for
        return pipeline.onboard_specialist(dataset, params, pretrained=pretrained, accepted=accepted,
                                           datasets=seen, client=client)
    run_id = pool_training.trained_run(params, dataset, theta0, flow_run_id)
    path = fetch_trained(params, client, run_id)
    get_run_logger().info("specialist %s trained on the work pool: MLflow run %s", dataset.name, run_id)
    with compute_slot():
        return pipeline.onboard_specialist(dataset, params, pretrained=pretrained, accepted=accepted,
                                           datasets=seen, client=client, trained=(run_id, path))


@task(name="all-in-one", task_run_name="all-in-one", cache_policy=NO_CACHE)
def train_all_in_one(datasets: Sequence[GeneratorDataset], params: Params, pretrained: Path) -> Path:
    """The All-in-one baseline (one model on every seen dataset), scored beside the merges."""
    with compute_slot():
        return plain(params, pretrained).all_in_one(list(datasets))


@task(name="remerge", task_run_name="remerge", cache_policy=NO_CACHE)
def remerge_candidate(
    params: Params,
    pretrained: Path,
    specialists: Sequence[pipeline.Specialist],
    found: pipeline.Scan,
    all_in_one: Path | None,
    final: bool = True,
) -> pipeline.Candidate | None:
    """R²M over `specialists` (+ baselines on the final step), evaluate, gate, register the candidate."""
    with compute_slot():
        return plain(params, pretrained).remerge(specialists, found, all_in_one, final)


@task(name="release", task_run_name="release-v{candidate.version}", cache_policy=NO_CACHE)
def release_candidate(
    params: Params, pretrained: Path, candidate: pipeline.Candidate, seen: Sequence[GeneratorDataset],
    specialists: Sequence[pipeline.Specialist],
) -> pipeline.Release:
    """ONNX export + parity, register, move `champion`, publish (the gate passed)."""
    with compute_slot():
        return plain(params, pretrained).release(candidate, seen, specialists)


@task(name="champion", cache_policy=NO_CACHE)
def current_champion(params: Params) -> str | None:
    return registry.alias_version(mlflow_store.client(params), registry.CHAMPION)


# ------------------------------------------------------------------------------- the flows


def task_steps(params: Params, pretrained: Path) -> LoopSteps:
    """The loop's steps as Prefect tasks (with the retries of params.yaml) around the functions
    of `plain_steps`; with `flow.work_pool` set, the fine-tuning runs on the pool: the backlog is
    handed over first (`train-<dataset>` tasks) and each `onboard-<dataset>` waits for its own."""
    retrying = retry_options(params)
    steps = LoopSteps(
        accepted=lambda generators: accepted_specialists(params, generators),
        onboard=lambda dataset, accepted, seen: onboard_generator.with_options(**retrying)(
            dataset, params, pretrained, accepted, seen),
        all_in_one=lambda datasets: train_all_in_one.with_options(**retrying)(datasets, params, pretrained),
        remerge=lambda specialists, found, all_in_one, final: remerge_candidate.with_options(**retrying)(
            params, pretrained, specialists, found, all_in_one, final),
        release=lambda candidate, seen, specialists: release_candidate.with_options(**retrying)(
            params, pretrained, candidate, seen, specialists),
        champion=lambda: current_champion(params),
    )
    if not params.flow.work_pool:
        return steps
    theta0 = file_sha256(pretrained)
    dispatched: dict[str, str | None] = {}

    def start_training(datasets: Sequence[GeneratorDataset]) -> None:
        for dataset in datasets:
            dispatched[dataset.name] = start_pool_training.with_options(**retrying)(dataset, params, theta0)

    def onboard(dataset, accepted, seen):
        return onboard_from_pool.with_options(**retrying)(dataset, params, pretrained, accepted, seen,
                                                          dispatched.get(dataset.name))

    return replace(steps, start_training=start_training, onboard=onboard)


def onboard_and_release(params: Params, pretrained: Path, found: pipeline.Scan,
                        datasets: Sequence[GeneratorDataset]) -> pipeline.LoopReport:
    """The loop's one sequence (`r2m.pipeline.loop.run_steps`) over `datasets`, with the steps as
    Prefect tasks (`task_steps`), then the run's artifacts. Called inside a flow. A rerun with
    nothing new finds the registered candidates and releases, so it trains, merges and registers
    nothing; after a crash it redoes the steps the registry shows as owed, in order.
    """
    report = run_steps(params, mlflow_store.client(params), found, list(datasets), task_steps(params, pretrained))
    publish_reports(params, report)
    logger = get_run_logger()
    for line in report.lines():
        logger.info(line)
    return report


@flow(name="r2m-watch")
def watch(params_file: str | None = None) -> pipeline.LoopReport:
    """Scan the data root and onboard every new seen generator dataset (the scheduled flow)."""
    params = load_params(params_file)
    ensure_compute_limit(params)
    with project_lock(params, on_wait=get_run_logger().warning):
        clean_leftovers(params)
        pretrained = prepare_theta0.with_options(**retry_options(params))(params)
        found = scan_data_root(params, pretrained)
        return onboard_and_release(params, pretrained, found, found.to_onboard)


@flow(name="r2m-onboard")
def onboard(generators: list[str] | None = None, params_file: str | None = None) -> pipeline.LoopReport:
    """Onboard the named seen datasets (None: every new one), then re-merge, gate and release."""
    params = load_params(params_file)
    ensure_compute_limit(params)
    with project_lock(params, on_wait=get_run_logger().warning):
        clean_leftovers(params)
        pretrained = prepare_theta0.with_options(**retry_options(params))(params)
        found = scan_data_root(params, pretrained)
        if generators is None:
            return onboard_and_release(params, pretrained, found, found.to_onboard)
        by_name = {d.name: d for d in found.seen}
        missing = [g for g in generators if g not in by_name]
        if missing:
            raise DatasetError(params.path("data_root") / missing[0],
                               "no valid seen generator dataset of that name under the data root")
        return onboard_and_release(params, pretrained, found, [by_name[g] for g in generators])


# --------------------------------------------------------------------------------- reports


def mlflow_base_url(params: Params) -> str:
    """The MLflow UI of the tracking store: the server itself, or `mlflow ui` for a local store."""
    uri = params.tracking_uri
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_MLFLOW_UI


def mlflow_run_url(params: Params, client, run_id: str) -> str:
    experiment = client.get_run(run_id).info.experiment_id
    return f"{mlflow_base_url(params)}/#/experiments/{experiment}/runs/{run_id}"


def mlflow_model_url(params: Params, model: str, version: str) -> str:
    return f"{mlflow_base_url(params)}/#/models/{model}/versions/{version}"


def scan_table(found: pipeline.Scan) -> list[dict]:
    new = {d.name for d in found.to_onboard}
    rows = [{"dataset": d.name, "role": d.role, "family": d.family, "domain": d.domain,
             "status": "new: onboard" if d.name in new else "onboarded", "detail": d.data_hash[:12]}
            for d in found.seen]
    rows += [{"dataset": d.name, "role": d.role, "family": d.family, "domain": d.domain,
              "status": "evaluation suite", "detail": d.data_hash[:12]} for d in found.unseen]
    rows += [{"dataset": r.path.name, "role": "", "family": "", "domain": "", "status": "quarantined",
              "detail": f"{r.reason} -> {r.quarantined_to}"} for r in found.rejected]
    return rows


def specialist_table(params: Params, specialists: Sequence[pipeline.Specialist]) -> list[dict]:
    return [{"generator": s.generator, "version": s.version, "status": s.status,
             "val_auc": round(s.val_auc, 4), "reason": s.reason,
             "mlflow": mlflow_model_url(params, registry.specialist_model_name(s.generator), s.version)}
            for s in specialists]


def gate_markdown(params: Params, report: pipeline.LoopReport, run_url: str) -> str:
    """The run's gate report: the verdict the candidate holds (`Candidate.report`), rendered by
    `r2m.evaluation.reporting` like everywhere else, with MLflow links and the earlier steps."""
    c = report.candidate
    verdict = "PASSED" if c.gate_passed else "FAILED"
    lines = [
        f"# Gate {verdict}: r2m-detector v{c.version}",
        "",
        f"- candidate: `{c.method}` with `{json.dumps(c.hparams, sort_keys=True)}`"
        + (" (unchanged since the last run)" if c.reused else ""),
        f"- verdict: {c.gate_reason}",
        f"- MLflow merge run: [{c.run_id}]({run_url}) "
        f"(local store: `{mlflow_store.ui_command(params)}`)",
        f"- detector version: [{c.version}]({mlflow_model_url(params, registry.DETECTOR, c.version)})",
        f"- champion now: {'v' + report.champion if report.champion else 'none'}",
    ]
    if report.release is not None and report.release.version == c.version:
        lines.append(f"- released v{report.release.version}: published `{report.release.published}`, "
                     f"ONNX sha256 `{report.release.onnx_sha256[:16]}`")
    elif not c.gate_passed:
        lines.append("- not released: the candidate stays a failed challenger; the champion is unchanged")
    if c.report:
        lines += ["", reporting.gate_markdown(c.report)]
    if report.steps:
        lines += ["", "Earlier steps of this run (one per onboarded generator, in order):", "",
                  "| detector version | verdict |", "|---|---|"]
        lines += [f"| [{s.version}]({mlflow_model_url(params, registry.DETECTOR, s.version)}) "
                  f"| {s.gate_reason} |" for s in report.steps]
    return "\n".join(lines)


def publish_reports(params: Params, report: pipeline.LoopReport) -> None:
    """Prefect artifacts of this run: datasets, specialists, and the gate report with MLflow links."""
    create_table_artifact(scan_table(report.scan), key="r2m-datasets",
                          description=f"Datasets under the data root: {report.scan.summary()}")
    if report.specialists or report.onboarded:
        create_table_artifact(specialist_table(params, [*report.onboarded, *report.specialists]),
                              key="r2m-specialists", description="Specialists onboarded in this run, then "
                              "every accepted specialist merged")
    if report.candidate is None:
        create_markdown_artifact("# No candidate\n\nNo accepted specialist yet: nothing to merge.",
                                 key="r2m-gate-report", description="Gate report")
        return
    client = mlflow_store.client(params)
    run_url = mlflow_run_url(params, client, report.candidate.run_id)
    create_markdown_artifact(gate_markdown(params, report, run_url), key="r2m-gate-report",
                             description=f"Gate report of r2m-detector v{report.candidate.version}")
    rules = reporting.gate_table(report.candidate.report)
    create_table_artifact(
        [{"rule": rule, **{column: (round(v, 4) if isinstance(v, float) else v) for column, v in zip(rules.columns, values)},
          "interval": None if bounds[0] is None else [round(b, 4) for b in bounds[0]]}
         for rule, values, bounds in zip(rules.rows, rules.values, rules.intervals)],
        key="r2m-gate-rules", description=f"Gate rules of r2m-detector v{report.candidate.version} ({run_url})",
    )
