"""The Prefect flows for real: a temporary Prefect server (`prefect_test_harness`, started once
for the module), a real MLflow SQLite store, real ONNX export, the tiny backbone on tiny data.

What the flows add over `r2m.pipeline` (whose loop tests are in test_pipeline.py): the watcher
runs the whole loop, its task runs carry the retries of params.yaml, its artifacts hold the
gate report with MLflow links, the global concurrency limit serialises heavy steps across
runs, and a run terminated mid-way is finished by the next one without duplicates.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from fixtures import make_generator_dataset

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry from the test server
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `flows/` lives at the project root, beside src/

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.settings import PREFECT_API_URL  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.continual import (  # noqa: E402
    COMPUTE_LIMIT,
    compute_slot,
    ensure_compute_limit,
    is_transient,
    onboard,
    retry_options,
    watch,
)
from r2m.config import load_params  # noqa: E402
from r2m.errors import DatasetError  # noqa: E402
from r2m.export.publish import list_versions  # noqa: E402
from r2m.tracking import mlflow_store, registry  # noqa: E402

# A lenient gate and specialist check: two-epoch specialists on 8 validation images are noisy,
# and what is tested here is the flow around the gate (the gate itself: test_gate.py).
LOOP = {
    "model": {"name": "r2m-tiny", "pretrained": None, "lr": 3.0e-4, "head_lr": None},
    "train": {"epochs": 2, "batch_size": 16},
    "flow": {"all_in_one": False, "min_specialist_val_auc": 0.0, "retries": 2, "retry_delay_s": 0},
    "gate": {"max_drop": 1.0, "min_gain_macro": -1.0, "max_regression": 1.0, "min_auc": 0.0},
    "merge": {"select": False, "baselines": ["wa"]},
    "export": {"int8": False, "parity_samples": 16},
}


@pytest.fixture(scope="module")
def prefect_server():
    """One temporary Prefect server (SQLite in a temp PREFECT_HOME) for every test here."""
    with prefect_test_harness(server_startup_timeout=180):
        yield PREFECT_API_URL.value()


@pytest.fixture
def loop_project(project):
    """A project with params.yaml (short recipe), two seen datasets and one unseen set."""
    (project / "params.yaml").write_text(yaml.safe_dump(LOOP, sort_keys=False))
    root = project / "data" / "generators"
    make_generator_dataset(root, "sq-ff", family="FS", n_per_class=32, groups=8, seed=1)
    make_generator_dataset(root, "sq2-ff", family="FR", n_per_class=32, groups=8, seed=2)
    make_generator_dataset(root, "sq-un", role="unseen", family="other", n_per_class=32, groups=8, seed=3)
    return project


def registry_state(params) -> dict:
    """What a run leaves behind that must converge: versions per model, champion, published."""
    client = mlflow_store.client(params)
    models = {rm.name: sorted(int(mv.version) for mv in client.search_model_versions(f"name='{rm.name}'"))
              for rm in client.search_registered_models()}
    return {"models": models, "champion": registry.alias_version(client, registry.CHAMPION),
            "published": list_versions(params.path("model_repository"))}


def test_concurrency_limit_serialises_heavy_steps(prefect_server, project):
    params = load_params(root=project, flow={"compute_slots": 1})
    ensure_compute_limit(params)
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(COMPUTE_LIMIT).limit == 1
    spans: list[tuple[float, float]] = []

    def heavy_step() -> None:
        with compute_slot():
            start = time.monotonic()
            time.sleep(1.0)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=heavy_step) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first, second = sorted(spans)
    assert second[0] >= first[1], f"two heavy steps overlapped: {spans}"


def test_retries_come_from_params_and_skip_r2m_errors(prefect_server, project):
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    params = load_params(root=project, flow={"retries": 2, "retry_delay_s": 0})
    options = retry_options(params)
    assert options["retries"] == 2 and options["retry_delay_seconds"] == 0
    calls = {"io": 0, "data": 0}

    @task(cache_policy=NO_CACHE)
    def flaky_io() -> str:
        calls["io"] += 1
        if calls["io"] < 3:
            raise OSError("database is locked")
        return "ok"

    @task(cache_policy=NO_CACHE)
    def bad_data() -> None:
        calls["data"] += 1
        raise DatasetError(project / "x", "no fake images")

    @flow
    def both() -> tuple:
        io = flaky_io.with_options(**options)()
        data = bad_data.with_options(**options)(return_state=True)
        return io, data.is_failed()

    assert both() == ("ok", True)
    assert calls == {"io": 3, "data": 1}  # two retries for I/O; a data error is not retried
    assert is_transient is options["retry_condition_fn"]


def test_watch_runs_the_loop_with_artifacts_then_does_nothing(prefect_server, loop_project):
    project = loop_project
    bad = make_generator_dataset(project / "data" / "generators", "broken", seed=5)
    shutil.rmtree(bad / "fake")  # no fake images: fails validation
    params_file = str(project / "params.yaml")
    params = load_params(params_file)

    state = watch(params_file=params_file, return_state=True)
    report = state.result()
    assert sorted(s.generator for s in report.onboarded) == ["sq-ff", "sq2-ff"]
    assert [r.path.name for r in report.scan.rejected] == ["broken"]
    assert not bad.exists() and (report.scan.rejected[0].quarantined_to / "REASON.txt").is_file()
    assert report.candidate.gate_passed, report.candidate.gate_reason
    assert report.release is not None and report.release.published.is_file()
    after_first = registry_state(params)
    assert after_first["champion"] == report.candidate.version
    assert after_first["published"] == [1, 2]  # a step over sq-ff, then both

    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))}
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    assert set(artifacts) == {"r2m-datasets", "r2m-specialists", "r2m-gate-report", "r2m-gate-rules"}
    gate_md = artifacts["r2m-gate-report"].data
    assert f"Gate PASSED: r2m-detector v{report.candidate.version}" in gate_md
    assert f"runs/{report.candidate.run_id}" in gate_md and "| max_drop |" in gate_md
    assert "quarantined" in str(artifacts["r2m-datasets"].data)
    by_name = {t.name: t for t in task_runs}
    heavy = ["onboard-sq-ff", "onboard-sq2-ff", "remerge", f"release-v{report.candidate.version}"]
    for name in heavy:
        assert by_name[name].empirical_policy.retries == params.flow.retries, name

    again = watch(params_file=params_file)
    assert again.onboarded == [] and again.release is None and again.candidate.reused
    assert registry_state(params) == after_first  # nothing trained, registered or published

    with pytest.raises(DatasetError, match="no valid seen generator dataset"):
        onboard(generators=["missing"], params_file=params_file)


def test_terminated_run_is_finished_by_the_next_one(prefect_server, loop_project):
    """SIGTERM the watcher while it re-merges; the next run converges without duplicates."""
    project = loop_project
    shutil.rmtree(project / "data" / "generators" / "sq2-ff")  # one specialist is enough here
    params_file = str(project / "params.yaml")
    env = {**os.environ, "PREFECT_API_URL": prefect_server,
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")]),  # flows/ and the r2m under test
           "R2M_PROJECT_ROOT": str(project), "OMP_NUM_THREADS": "1"}
    log = project / "watch.log"
    with log.open("w") as out:
        child = subprocess.Popen([sys.executable, "-c", f"from flows.continual import watch; watch({params_file!r})"],
                                 cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
    candidates = project / "artifacts" / "candidates"
    deadline = time.monotonic() + 240
    while not candidates.exists():  # the re-merge has started: the specialist is registered
        assert child.poll() is None, f"the watcher ended before re-merging:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the watcher did not reach the re-merge"
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    child.wait(timeout=120)
    params = load_params(params_file)
    killed = registry_state(params)
    assert killed["champion"] is None and killed["published"] == []

    report = watch(params_file=params_file)
    assert report.onboarded == []  # registered before the kill: not trained again
    end = registry_state(params)
    assert end["models"]["specialist-sq-ff"] == [1]
    assert end["models"][registry.DETECTOR] == [1]
    assert end["champion"] == "1" and end["published"] == [1]


def test_flow_waits_for_the_project_lock(prefect_server, project):
    """The flows take `r2m run`'s project lock: while another run holds it, `watch` does nothing."""
    from r2m.pipeline.lock import project_lock

    (project / "params.yaml").write_text(yaml.safe_dump(LOOP, sort_keys=False))
    bad = make_generator_dataset(project / "data" / "generators", "broken", seed=5)
    shutil.rmtree(bad / "fake")  # invalid: a watch run that gets going quarantines it
    params_file = str(project / "params.yaml")
    params = load_params(params_file)
    result: dict = {}
    with project_lock(params):
        runner = threading.Thread(target=lambda: result.update(report=watch(params_file=params_file)))
        runner.start()
        time.sleep(8)
        assert runner.is_alive() and bad.exists()  # waiting: nothing scanned or quarantined
    runner.join(timeout=300)
    assert not runner.is_alive() and not bad.exists()
    assert [r.path.name for r in result["report"].scan.rejected] == ["broken"]
