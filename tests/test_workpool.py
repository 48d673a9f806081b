"""Training on a Prefect work pool, end to end, on real servers started here.

A real Prefect server (its own process), a `process` work pool with TWO workers (each its own
process, `--limit 1`: one training at a time each, like one worker per GPU), the training
deployment registered by `python -m flows.pool deploy`, and a real MLflow tracking server that
the loop and both workers share (nothing is handed over on local disk: each worker logs its
checkpoint as a run artifact through the server, the loop downloads it). The watcher, run as its
own process with `flow.work_pool` set, finds two new generator datasets, hands both trainings
to the pool at once, and then re-merges, gates and releases one step at a time, in onboarding
order. The test observes, from the servers' own records:

- the two trainings overlap in time, on the two workers (each worker's own log names the run it
  handed to its process; the MLflow training runs record when the training itself started and
  ended);
- each specialist is registered from its worker's training run (an artifact URI of that run);
- the steps are one at a time, in order: specialist 1 registered → detector v1 (re-merge, gate)
  → specialist 2 registered → detector v2, and v2 is the published champion.

Tracking is the team stack of tests/servers.py (the `team_registry` fixture, from conftest.py:
PostgreSQL backend store, moto S3 artifact store behind the MLflow server's proxy, the registry
emptied first); the workers get only `MLFLOW_TRACKING_URI`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from fixtures import LOOP, make_data

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "r2m-test-pool"
DEPLOYMENT = "r2m-train-specialist/pool"
START_TIMEOUT_S = 180.0

# the loop on tiny data (tests/fixtures.py); trainings long enough (~10-30 s here) to overlap although
# each flow run first spends 10-30 s starting Python and importing torch, MLflow and Prefect on 2 busy cores
PARAMS = {
    **LOOP,
    "train": {"epochs": 24, "batch_size": 16},  # long enough for the two trainings to overlap
    # 24 epochs overfit the tiny random ViT to its own 8 real validation images: the honest sq2-ff
    # then calls sq-ff's reals "more fake" (AUC 0.875 > 0.8) and the outlier check rejects it.
    # That check has its own tests (test_pipeline: a label-flipped dataset); this test is about the pool's mechanics.
    "flow": {**LOOP["flow"], "work_pool": POOL, "train_deployment": DEPLOYMENT, "retries": 0,
             "train_timeout_s": 600, "max_real_disagreement": 1.0},
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115 -- the child's stdout for its lifetime
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            cwd=cwd, start_new_session=True)


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the process group, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def wait_http(url: str, proc: subprocess.Popen, log: Path, what: str) -> float:
    begin = time.monotonic()
    while True:
        assert proc.poll() is None, f"{what} exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return time.monotonic() - begin
        except OSError:
            pass
        assert time.monotonic() - begin < START_TIMEOUT_S, f"{what} not up:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


@dataclass
class Pool:
    api_url: str
    env: dict[str, str]  # a Prefect client's environment (server, home)
    workers: dict[str, subprocess.Popen]
    logs: Path


@contextmanager
def prefect_server(work: Path, pool: str = POOL) -> Iterator[Pool]:
    """`prefect server start` as its own process, and a `process` work pool on it (created with
    `prefect work-pool create`); the workers are started by `start_workers`, stopped here."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(work / "home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO"}
    log = work / "server.log"
    server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                   log, env, work)
    workers: dict[str, subprocess.Popen] = {}
    try:
        took = wait_http(f"{api}/health", server, log, "prefect server")
        print(f"\nprefect server up in {took:.1f} s", file=sys.stderr)
        made = subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stdout + made.stderr
        yield Pool(api_url=api, env=env, workers=workers, logs=work)
    finally:
        for proc in workers.values():
            stop(proc)
        stop(server)


@pytest.fixture(scope="module")
def prefect_pool(tmp_path_factory):
    """A Prefect server process and a `process` work pool (the workers start in the test)."""
    with prefect_server(tmp_path_factory.mktemp("prefect")) as pool:
        yield pool


def start_workers(pool: Pool, project: Path, tracking_env: dict, n: int = 2, pool_name: str = POOL) -> dict:
    """`prefect worker start --pool ... --limit 1`, n times: what a user runs on each GPU host.
    Returns the environment of the workers (and of the loop: the same servers and code)."""
    env = {**pool.env, **tracking_env,
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]),  # the r2m and flows/ under test
           "R2M_PROJECT_ROOT": str(project),  # the worker's own project: params.yaml paths, data root
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "0"}
    for i in range(1, n + 1):
        name = f"worker-{i}"
        pool.workers[name] = start([str(BIN / "prefect"), "worker", "start", "--pool", pool_name, "--type", "process",
                                    "--name", name, "--limit", "1"], pool.logs / f"{name}.log", env, project)
    return env


def read_flow_runs(pool: Pool, deployment: str = DEPLOYMENT):
    """The training deployment's flow runs, and each one's log lines (from the Prefect server)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: pool.api_url}):
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=[deployment.split("/")[1]])))
            logs = {r.id: [entry.message for entry in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id])))] for r in runs}
    return runs, logs


def test_backlog_trains_in_parallel_on_two_workers_then_releases_in_order(team_registry, prefect_pool, project,
                                                                          monkeypatch):
    team_stack = team_registry
    from r2m.config import load_params
    from r2m.export.publish import list_versions
    from r2m.tracking import mlflow_store, registry

    began = time.monotonic()
    (project / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    env = start_workers(prefect_pool, project, team_stack.env)
    deployed = subprocess.run([sys.executable, "-m", "flows.pool", "deploy", "--source", str(REPO)],
                              env=env, cwd=project, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert f"on work pool {POOL}" in deployed.stdout

    make_data(project / "data" / "generators")  # two new seen datasets (sq-ff, sq2-ff) + an unseen one
    watcher_log = project / "watch.log"
    watcher = start([sys.executable, "-c", "from flows.continual import watch; watch()"], watcher_log, env, project)
    try:
        watcher.wait(timeout=900)
    finally:
        stop(watcher)
    assert watcher.returncode == 0, watcher_log.read_text()[-6000:]
    loop_s = time.monotonic() - began

    # --- the two trainings ran on the pool, on the two workers, at the same time
    runs, logs = read_flow_runs(prefect_pool)
    assert sorted(r.name for r in runs) == ["train-sq-ff", "train-sq2-ff"]
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state) for r in runs]
    ran_on = {}
    for r in runs:  # both workers may try to take a run; the one that got it hands it to its process
        assert any(m.endswith(f"Flow run '{r.name}' submitted to infrastructure") for m in logs[r.id]), logs[r.id]
        named = {w for w in prefect_pool.workers
                 if f"Flow run '{r.name}' submitted to infrastructure" in (prefect_pool.logs / f"{w}.log").read_text()}
        assert len(named) == 1, (r.name, named)
        ran_on[r.name] = named.pop()
    assert sorted(ran_on.values()) == ["worker-1", "worker-2"], ran_on
    a, b = sorted(runs, key=lambda r: r.start_time)
    assert b.start_time < a.end_time, f"the flow runs did not overlap: {[(r.name, r.start_time, r.end_time) for r in runs]}"

    for key, value in team_stack.env.items():
        monkeypatch.setenv(key, value)
    params = load_params(project / "params.yaml")
    client = mlflow_store.client(params)
    assert params.tracking_uri == team_stack.tracking_uri
    spans = {}
    specialists = {}
    for generator in ("sq-ff", "sq2-ff"):
        [mv] = client.search_model_versions(f"name='{registry.specialist_model_name(generator)}'")
        assert mv.tags["status"] == "accepted", mv.tags
        train_run = client.get_run(mv.run_id)  # registered from the worker's own training run
        assert mv.tags["artifact_uri"].startswith(f"runs:/{mv.run_id}/checkpoint/"), mv.tags
        assert train_run.data.tags["r2m.trained"] == "true"
        assert train_run.data.tags["r2m.prefect_flow_run"] == str(next(r.id for r in runs if r.name == f"train-{generator}"))
        spans[generator] = json.loads(train_run.data.tags["r2m.train_span"])[:2]
        specialists[generator] = mv
    (s1, e1), (s2, e2) = spans["sq-ff"], spans["sq2-ff"]
    overlap = min(e1, e2) - max(s1, s2)
    assert overlap > 0, f"the trainings did not overlap: {spans}"
    print(f"\ntrainings: sq-ff {e1 - s1:.1f} s, sq2-ff {e2 - s2:.1f} s, overlapping {overlap:.1f} s "
          f"on {ran_on}; loop done {loop_s:.0f} s after the test began", file=sys.stderr)

    # --- then the gated re-merges, one at a time, in onboarding order, and the champion published
    detector = sorted(client.search_model_versions(f"name='{registry.DETECTOR}'"), key=lambda mv: int(mv.version))
    assert [mv.version for mv in detector] == ["1", "2"]
    first, second = specialists["sq-ff"], specialists["sq2-ff"]
    order = [int(first.creation_timestamp), int(detector[0].creation_timestamp),
             int(second.creation_timestamp), int(detector[1].creation_timestamp)]
    assert order == sorted(order), "steps out of order: specialist 1, v1, specialist 2, v2 expected"
    assert json.loads(detector[0].tags["lineage.specialists"]) == {"sq-ff": "1"}
    assert json.loads(detector[1].tags["lineage.specialists"]) == {"sq-ff": "1", "sq2-ff": "1"}
    assert all(mv.tags.get("gate") == "passed" for mv in detector), [mv.tags.get("gate") for mv in detector]
    assert registry.alias_version(client, registry.CHAMPION) == "2"
    assert list_versions(params.path("model_repository")) == [1, 2]
    assert not (project / "artifacts" / "specialists").exists()  # nothing was trained in the loop's process


# ------------------------------------------------------------------ refusals (no servers needed)


def test_worker_refuses_data_or_theta0_other_than_the_loops(project):
    from fixtures import loop_params

    from r2m.checkpoint import file_sha256
    from r2m.data import validate_dataset
    from r2m.errors import ConfigError, DatasetError
    from r2m.models import ensure_pretrained
    from r2m.pipeline import pool

    root = make_data(project / "data" / "generators")
    params = loop_params(project)
    dataset = validate_dataset(root / "sq-ff", root, params.data)
    theta0 = file_sha256(ensure_pretrained(params, progress=False))
    with pytest.raises(DatasetError, match="the loop asked for 000000000000"):
        pool.train_and_log(params, "sq-ff", "0" * 64, theta0)
    with pytest.raises(ConfigError, match="θ0 sha256 .* the loop's is ffffffffffff"):
        pool.train_and_log(params, "sq-ff", dataset.data_hash, "f" * 64)
    assert not (project / "artifacts" / "specialists").exists()  # nothing trained
    with pytest.raises(ConfigError, match="unexpected section 'paths'"):
        pool.worker_params({**pool.training_config(params), "paths": {}})
    assert pool.worker_params(pool.training_config(params)).train == params.train


def test_pool_configuration_errors_name_the_setting(project):
    from flows.pool import deploy, deployment_names

    from r2m.config import load_params
    from r2m.errors import ConfigError

    with pytest.raises(ConfigError, match="flow.work_pool is null"):
        deploy(load_params(root=project))
    bad = load_params(root=project, flow={"work_pool": POOL, "train_deployment": "other-flow/pool"})
    with pytest.raises(ConfigError, match="flow.train_deployment 'other-flow/pool': expected 'r2m-train-specialist/"):
        deployment_names(bad)
