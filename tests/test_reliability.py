"""What the loop guarantees (docs/usage.md, "Reliability"): history is never rewritten, one run
at a time per project, a moved or copied project works on its own files, serving follows
`champion` both ways, and a kill -9 leaves nothing the next run trips over.

Real components throughout: `r2m run` / `r2m serve` / `r2m rollback` as processes, the MLflow
SQLite store, ONNX Runtime, HTTP on loopback; the tiny backbone on tiny datasets.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from fixtures import LOOP, add, loop_params, state

import r2m as r2m_package
from r2m.pipeline import run_once
from r2m.tracking import mlflow_store, registry

STRICT_GATE = {**LOOP["gate"], "min_auc": 1.01}  # nothing passes


def detector_versions(client) -> dict[str, dict]:
    """Every detector version as stored: tags, run, source, description."""
    return {str(mv.version): {"tags": dict(mv.tags), "run_id": mv.run_id, "source": mv.source,
                              "description": mv.description}
            for mv in client.search_model_versions(f"name='{registry.DETECTOR}'")}


def all_versions(client):
    return [mv for rm in client.search_registered_models() for mv in client.search_model_versions(f"name='{rm.name}'")]


def write_params(project: Path, **extra) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump({**LOOP, **extra}, sort_keys=False))


def cli(project: Path, *args: str, **popen) -> subprocess.Popen:
    src = str(Path(r2m_package.__file__).resolve().parents[1])  # the r2m under test, whatever the cwd
    env = {**os.environ, "R2M_PROJECT_ROOT": str(project), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.Popen([sys.executable, "-m", "r2m.cli", *args], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


# ------------------------------------------------------------------- 1. immutable history


def test_changed_gate_is_a_new_version_and_old_tags_stay_byte_identical(project, data_root):
    strict = loop_params(project, gate=STRICT_GATE)
    failed = run_once(strict, progress=False)
    assert not failed.candidate.gate_passed and "min_auc" in failed.candidate.gate_reason
    client = mlflow_store.client(strict)
    before = detector_versions(client)
    assert sorted(before) == ["1", "2"] and all(v["tags"]["gate"] == "failed" for v in before.values())

    lenient = loop_params(project)  # the same specialists and merge, a changed gate
    report = run_once(lenient, progress=False)
    after = detector_versions(client)
    for version, stored in before.items():  # the old verdicts, keys and lineage: byte for byte
        assert json.dumps(after[version], sort_keys=True) == json.dumps(stored, sort_keys=True)
    new = after[report.candidate.version]
    assert report.candidate.version == "3" and report.candidate.gate_passed
    assert new["tags"]["gate"] == "passed" and new["run_id"] != before["2"]["run_id"]  # a new evaluation
    assert new["tags"]["sha256"] == before["2"]["tags"]["sha256"]  # of the same merged checkpoint
    assert new["tags"]["candidate_key"] != before["2"]["tags"]["candidate_key"]
    assert state(lenient)["champion"] == "3"


# ------------------------------------------------------------------- 2. one run at a time


def test_two_r2m_runs_a_second_apart_onboard_once(project, data_root):
    write_params(project)
    first = cli(project, "run", "-q")
    time.sleep(1.0)
    second = cli(project, "run", "-q")
    outs = [p.communicate(timeout=900) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outs
    waited = [err for _, err in outs if "waiting for the r2m loop run holding" in err]
    assert len(waited) == 1, outs  # exactly one of them found the other holding the lock
    end = state(loop_params(project))
    assert end["models"]["specialist-sq-ff"] == [1] and end["models"]["specialist-sq2-ff"] == [1]
    assert end["models"][registry.DETECTOR] == [1, 2] and end["published"] == [1, 2]
    assert end["champion"] == "2"


def test_no_wait_refuses_in_one_line_while_the_lock_is_held(project, data_root):
    from r2m.pipeline.lock import LoopBusy, project_lock

    write_params(project)
    params = loop_params(project)
    with project_lock(params) as path:
        busy = cli(project, "run", "-q", "--no-wait")
        out, err = busy.communicate(timeout=300)
        assert busy.returncode == 2, (out, err)
        assert err.count("\n") == 1 and "another r2m loop run holds" in err and str(path) in err
        with pytest.raises(LoopBusy, match="holds this project's lock"):
            run_once(params, progress=False, wait=False)
    assert state(params)["models"] == {}  # the refused runs touched nothing


# ------------------------------------------------------------------- 3. relocatable


def files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_a_copied_then_moved_project_runs_on_its_own_files(project, data_root, monkeypatch):
    first = run_once(loop_params(project), progress=False)
    assert first.candidate.version == "2"
    original = files_under(project)

    copy = project.parent / f"{project.name}-copy"
    shutil.copytree(project, copy)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("R2M_PROJECT_ROOT", str(copy))
    add(copy / "data" / "generators", "sq3-ff", family="EFS", seed=4)
    params = loop_params(copy)
    report = run_once(params, progress=False)  # onboards, merges, evaluates and releases in the copy
    assert [s.generator for s in report.onboarded] == ["sq3-ff"] and report.candidate.version == "3"
    assert state(params)["champion"] == "3" and state(params)["published"] == [1, 2, 3]
    assert files_under(project) == original  # the original was not written to
    assert "MLFLOW_TRACKING_URI" not in os.environ  # no store leaks from one project to the next
    from r2m.tracking.artifacts import resolve_checkpoint

    client = mlflow_store.client(params)
    for mv in all_versions(client):
        assert resolve_checkpoint(params, client, mv).is_relative_to(copy), (mv.name, mv.version)
        for key, value in [*mv.tags.items(), ("source", mv.source)]:  # no path on this machine
            assert str(project.parent) not in value and not value.startswith("/"), (mv.name, mv.version, key)

    moved = project.parent / f"{project.name}-moved"
    copy.rename(moved)
    monkeypatch.chdir(moved)
    monkeypatch.setenv("R2M_PROJECT_ROOT", str(moved))
    params = loop_params(moved)
    again = run_once(params, progress=False)
    assert again.onboarded == [] and again.candidate.reused and again.candidate.version == "3"
    assert state(params)["published"] == [1, 2, 3]
    assert not copy.exists()  # nothing was read from or written to where it was
    client = mlflow_store.client(params)
    assert all(resolve_checkpoint(params, client, mv).is_relative_to(moved) for mv in all_versions(client))


# ------------------------------------------------------------------- 4. serving follows champion


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answering(client: httpx.Client, want_registry: str, png: bytes, timeout_s: float = 30.0) -> dict:
    """Ask the server until the registry version `want_registry` answers; what it said last."""
    deadline = time.monotonic() + timeout_s
    while True:
        detect = client.post("/v1/detect", files={"file": ("f.png", png, "image/png")}).json()
        lineage = client.get("/v2/models/r2m_detector").json()["parameters"]["lineage"]
        said = {"repository_version": detect["model_version"], "registry_version": lineage["model_version"]}
        if said["registry_version"] == want_registry or time.monotonic() > deadline:
            return said
        time.sleep(0.2)


def test_rollback_and_promote_move_what_the_running_server_serves(project, data_root):
    shutil.rmtree(data_root / "sq2-ff")
    write_params(project, serve={"poll_interval_s": 0.2})
    params = loop_params(project, serve={"poll_interval_s": 0.2})
    assert run_once(params, progress=False).release.version == "1"
    png = (data_root / "sq-ff" / "real").glob("*.png").__next__().read_bytes()

    port = _free_port()
    server = cli(project, "serve", "--port", str(port))
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        assert _answering(client, "1", png) == {"repository_version": 1, "registry_version": "1"}

        add(data_root, "sq2-ff", family="FR", seed=2)
        released = run_once(params, progress=False).release
        assert released.version == "2"  # promoted and published: the server moves to it
        assert _answering(client, "2", png) == {"repository_version": 2, "registry_version": "2"}

        rollback = cli(project, "rollback")
        out, err = rollback.communicate(timeout=300)
        assert rollback.returncode == 0, err
        assert "champion: r2m-detector v1 (was v2" in out and "serving: r2m_detector/1" in out
        assert _answering(client, "1", png) == {"repository_version": 1, "registry_version": "1"}

        again = run_once(params, progress=False)  # the loop respects the rollback and keeps serving v1
        assert again.release is None and again.champion == "1"
        assert state(params)["published"] == [1, 2]
        assert _answering(client, "1", png, timeout_s=2) == {"repository_version": 1, "registry_version": "1"}

        promote = cli(project, "promote", "2")
        out, err = promote.communicate(timeout=300)
        assert promote.returncode == 0 and "serving: r2m_detector/2" in out, err
        assert _answering(client, "2", png) == {"repository_version": 2, "registry_version": "2"}
        assert server.poll() is None  # one server process all along: hot reloads
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_rollback_republishes_a_lost_copy_from_the_registry_and_refuses_a_version_never_exported(
        project, data_root):
    from r2m.errors import RegistryError
    from r2m.export.metadata import read_metadata
    from r2m.export.publish import served_version
    from r2m.pipeline import promotion

    params = loop_params(project)
    run_once(params, progress=False)  # v1 then v2 released; previous-champion = v1
    client = mlflow_store.client(params)
    repo = params.path("model_repository")
    shutil.rmtree(repo / "r2m_detector" / "1")  # v1's published copy is gone
    client.delete_model_version_tag(registry.DETECTOR, "1", "onnx_uri")  # ... and the registry has no ONNX of it
    with pytest.raises(RegistryError, match="v1 has no published copy .* and no registered ONNX file"):
        promotion.rollback(params, client)
    assert registry.alias_version(client, registry.CHAMPION) == "2" and served_version(repo) == 2

    # v2's copy lost too, but v2 has its registered ONNX: the repository gets it back from there
    shutil.rmtree(repo / "r2m_detector" / "2")
    served = promotion.serve_champion(params, client)
    sha = registry.get_version(client, "2").tags["sha256"]
    assert served is not None and served.is_file() and served_version(repo) == int(served.parent.name)
    assert read_metadata(served)["lineage"]["checkpoint_sha256"] == sha


# ------------------------------------------------------------------- 5. leftovers of a kill -9


def test_leftovers_of_a_kill_are_cleaned_and_replaced(project, data_root):
    specialists = project / "artifacts" / "specialists"
    (half,) = specialists.glob("sq2-ff-*.safetensors")
    os.remove(str(half) + ".json")  # killed between the tensors and the sidecar
    leftovers = [specialists / f".{half.name}.k1ll3d.tmp", project / "artifacts" / "candidates" / "abc" /
                 ".r2m.safetensors.x1.tmp", project / "artifacts" / "candidates" / "abc" / "r2m.safetensors"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half written")
    params = loop_params(project)
    report = run_once(params, progress=False)
    assert not any(p.exists() for p in leftovers)
    assert not list((project / "artifacts").rglob("*.tmp"))
    assert half.is_file() and (half.parent / (half.name + ".json")).is_file()  # trained again, whole
    assert [s.generator for s in report.onboarded] == ["sq-ff", "sq2-ff"]
    end = state(params)
    assert end["models"]["specialist-sq2-ff"] == [1] and end["champion"] == "2" and end["published"] == [1, 2]


def test_kill_between_promote_and_publish_leaves_no_challenger_on_the_champion(project, data_root, monkeypatch):
    shutil.rmtree(data_root / "sq2-ff")  # one step: the candidate is the final one
    original = registry._set_or_delete

    def killed_after_champion_write(client, alias, version):
        if alias == registry.CHALLENGER and version is None:  # champion written, challenger not yet cleared
            raise KeyboardInterrupt("kill -9 between promote and publish")
        return original(client, alias, version)

    monkeypatch.setattr(registry, "_set_or_delete", killed_after_champion_write)
    params = loop_params(project)
    with pytest.raises(KeyboardInterrupt):
        run_once(params, progress=False)
    client = mlflow_store.client(params)
    assert registry.alias_version(client, registry.CHAMPION) == "1"
    assert registry.alias_version(client, registry.CHALLENGER) == "1" and state(params)["published"] == []

    monkeypatch.setattr(registry, "_set_or_delete", original)
    report = run_once(params, progress=False)
    assert report.champion == "1" and state(params)["published"] == [1]
    assert registry.alias_version(client, registry.CHALLENGER) is None  # not left on the champion


def test_run_killed_with_sigkill_is_finished_by_the_next_run(project, data_root):
    """A real kill -9 of `r2m run` while it re-merges: the lock dies with it; the rerun converges."""
    write_params(project)
    child = cli(project, "run", "-q")
    candidates = project / "artifacts" / "candidates"
    deadline = time.monotonic() + 300
    while not candidates.exists():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "r2m run did not reach the re-merge"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    rerun = cli(project, "run", "-q", "--no-wait")  # the lock was released by the kernel
    out, err = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, err
    end = state(loop_params(project))
    assert end["models"]["specialist-sq-ff"] == [1] and end["models"]["specialist-sq2-ff"] == [1]
    assert end["models"][registry.DETECTOR] == [1, 2] and end["champion"] == "2" and end["published"] == [1, 2]
    assert not list((project / "artifacts").rglob("*.tmp"))
