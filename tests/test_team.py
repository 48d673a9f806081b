"""r2m for a team, against real servers started by the tests (tests/servers.py): an
MLflow server as its own process on PostgreSQL + an S3 API server (moto), used by `r2m`
processes that are given nothing but `MLFLOW_TRACKING_URI`.

- two `r2m run` at once, from two project folders with the same data (two machines), leave
  exactly one version per specialist and per candidate and consistent aliases: the registry
  lock serialises them, the second finds the work done and serves the champion it fetched;
- nothing in the registry names a path of either machine; artifacts are in the object store;
- a third, fresh project folder (no checkpoints, no published models) resolves the champion
  and its artifacts from the server: `r2m run` serves it, `r2m rollback` / `r2m promote` work;
- the registry lock itself: refused without waiting, kept alive by its heartbeat, a dead
  holder's lock broken after its TTL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from fixtures import LOOP, make_data, versions

REPO = Path(__file__).resolve().parents[1]
WAITED = "waiting for the r2m loop run holding r2m-loop-lock"


def project_dir(root: Path) -> Path:
    """A project folder with params.yaml (the tests' tiny loop) and `make_data`'s datasets."""
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(LOOP, sort_keys=False))
    make_data(root / "data" / "generators")
    return root


def r2m(project: Path, stack, *args: str) -> subprocess.Popen:
    """`r2m <args>` in `project`, as a user on another machine runs it: this checkout's code, the
    tracking server's URI and nothing else of the servers (no S3 endpoint or keys)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "R2M_"))}
    env.update(stack.env, R2M_PROJECT_ROOT=str(project), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TQDM_DISABLE="1", PYTHONPATH=os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-m", "r2m.cli", *args], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def done(proc: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    return out, err


def client_of(stack):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=stack.tracking_uri, registry_uri=stack.tracking_uri)


def registry_texts(client):
    """Every text the registry and the runs hold: (where, text) for each tag, param and description."""
    for rm in client.search_registered_models():
        yield f"{rm.name}: description", rm.description or ""
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            yield f"{rm.name} v{mv.version}: description", mv.description or ""
            yield f"{rm.name} v{mv.version}: source", mv.source or ""
            for key, value in mv.tags.items():
                yield f"{rm.name} v{mv.version}: tag {key}", value
    for exp in client.search_experiments():
        yield f"experiment {exp.name}: artifact location", exp.artifact_location
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            yield f"run {run.info.run_name}: artifact uri", run.info.artifact_uri
            for key, value in {**run.data.params, **run.data.tags}.items():
                yield f"run {run.info.run_name}: {key}", value


def served_sha(project: Path) -> str:
    """The checkpoint sha256 of the model the project's repository serves."""
    from r2m.export.metadata import read_metadata
    from r2m.export.publish import MODEL_FILE, model_dir, served_version

    repo = project / "deploy" / "model_repository"
    version = served_version(repo)
    assert version is not None, f"{repo}: serves nothing"
    return read_metadata(model_dir(repo) / str(version) / MODEL_FILE)["lineage"]["checkpoint_sha256"]


def test_two_machines_at_once_then_a_third_resolves_everything_from_the_server(team_registry, tmp_path,
                                                                              monkeypatch):
    from typer.testing import CliRunner

    from r2m.cli import app
    from r2m.tracking import registry

    stack = team_registry
    a, c = project_dir(tmp_path / "machine-a"), project_dir(tmp_path / "machine-c")
    started = time.monotonic()
    runs = [r2m(a, stack, "run", "-q"), r2m(c, stack, "run", "-q")]
    (out_a, err_a), (out_c, err_c) = [done(p) for p in runs]
    both_s = time.monotonic() - started
    print(f"\ntwo `r2m run` at once against the team stack: {both_s:.1f} s")
    assert sum(WAITED in err for err in (err_a, err_c)) == 1, (err_a, err_c)  # one waited for the other
    for out in (out_a, out_c):
        assert "champion: r2m-detector v2" in out, out

    client = client_of(stack)
    assert versions(client, "specialist-sq-ff") == [1] and versions(client, "specialist-sq2-ff") == [1]
    detector = client.search_model_versions(f"name='{registry.DETECTOR}'")
    keys = [mv.tags["candidate_key"] for mv in detector]
    assert sorted(int(mv.version) for mv in detector) == [1, 2] and len(set(keys)) == 2  # one version per candidate
    assert registry.alias_version(client, registry.CHAMPION) == "2"
    assert registry.alias_version(client, registry.PREVIOUS) == "1"
    assert registry.alias_version(client, registry.CHALLENGER) is None  # moved on by the promotion
    assert registry.get_version(client, "2").tags["promoted_over"] == "1"
    assert not [rm.name for rm in client.search_registered_models() if registry.is_lock_model(rm.name)]

    # nothing in the registry or the runs points at either machine's folders
    for where, text in registry_texts(client):
        assert str(tmp_path) not in text and "file:" not in text, f"{where}: {text}"
    onnx_uri = registry.get_version(client, "2").tags["onnx_uri"]
    assert onnx_uri.startswith("runs:/") and onnx_uri.endswith("/onnx/r2m-detector-v2.onnx")

    # the artifacts are in the object store behind the server
    from servers import s3_client

    keys = [o["Key"] for page in s3_client(stack.s3_endpoint).get_paginator("list_objects_v2").paginate(
        Bucket=stack.bucket, Prefix="mlartifacts/") for o in page.get("Contents", [])]
    for suffix in ("/checkpoint/r2m.safetensors", "/checkpoint/r2m.safetensors.json", "/onnx/r2m-detector-v2.onnx",
                   "/plots/drop_heatmap.png", "/tables/seen_auc.csv"):
        assert any(k.endswith(suffix) for k in keys), (suffix, keys[:20])

    champion_sha = registry.get_version(client, "2").tags["sha256"]
    assert served_sha(a) == champion_sha and served_sha(c) == champion_sha  # c fetched what a released

    # a third machine: the same data (docs/usage.md: `dvc pull`), nothing else of its own
    b = project_dir(tmp_path / "machine-b")
    out, _ = done(r2m(b, stack, "run", "-q"))
    assert "2 seen, 1 unseen, 0 new to onboard" in out and "champion: r2m-detector v2" in out, out
    assert served_sha(b) == champion_sha
    fetched = sorted(p.name.split("-")[0] for p in (b / "artifacts" / "cache" / "checkpoints").rglob("*.safetensors"))
    assert fetched == ["r2m.safetensors", "sq", "sq2"], fetched  # the specialists and the champion, downloaded
    assert not (b / "artifacts" / "specialists").exists()  # nothing trained here

    # the alias commands there (in this process: the same commands, without another start-up)
    monkeypatch.chdir(b)
    monkeypatch.setenv("R2M_PROJECT_ROOT", str(b))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.tracking_uri)
    runner = CliRunner()
    result = runner.invoke(app, ["rollback"])
    assert result.exit_code == 0 and "champion: r2m-detector v1 (was v2" in result.output, result.output
    assert served_sha(b) == registry.get_version(client, "1").tags["sha256"]  # v1 fetched and served
    result = runner.invoke(app, ["promote", "2"])
    assert result.exit_code == 0 and "champion: r2m-detector v2" in result.output, result.output
    assert served_sha(b) == champion_sha
    assert versions(client, registry.DETECTOR) == [1, 2]  # none of this registered anything


def test_the_registry_lock_refuses_waits_and_breaks_a_dead_holders_lock(team_registry):
    from r2m.pipeline.lock import REGISTRY_LOCK, LoopBusy, registry_lock
    from r2m.tracking import registry

    client = client_of(team_registry)
    # a lock whose holder died: it exists, and its heartbeat never changes
    client.create_registered_model(REGISTRY_LOCK, tags={"token": "dead", "beat": "0",
                                                         "holder": '{"pid": 1, "host": "gone", "since": "then"}'})
    with pytest.raises(LoopBusy, match="holds the registry lock r2m-loop-lock .pid 1 on gone"):
        with registry_lock(client, wait=False):
            pass
    told: list[str] = []
    start = time.monotonic()
    with registry_lock(client, ttl_s=1.5, poll_s=0.1, on_wait=told.append) as token:
        assert time.monotonic() - start >= 1.5  # broken only once its heartbeat was silent for the TTL
        assert client.get_registered_model(REGISTRY_LOCK).tags["token"] == token
        assert client.get_registered_model(f"{REGISTRY_LOCK}.broken.dead")  # who broke it, recorded once
        assert len(told) == 1 and "pid 1 on gone" in told[0]
    with pytest.raises(Exception, match="RESOURCE_DOES_NOT_EXIST"):
        client.get_registered_model(REGISTRY_LOCK)  # released

    # a live holder's heartbeat keeps a waiter with a short TTL from breaking it
    held, release = threading.Event(), threading.Event()

    def holder():
        with registry_lock(client, beat_s=0.2):
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(30)
        with pytest.raises(LoopBusy, match="still held after 3 s"):
            with registry_lock(client, ttl_s=1.0, poll_s=0.1, timeout_s=3):
                pass
    finally:
        release.set()
        thread.join(30)
    assert not any(registry.is_lock_model(r["model"]) for r in registry.describe_models(client))
