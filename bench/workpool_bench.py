"""What a work pool saves on a backlog: two specialists trained one after the other (one worker)
vs in parallel (two workers), on this machine. Not a test: run it by hand.

    PYTHONPATH=src:.:tests .venv/bin/python bench/workpool_bench.py [--epochs 15] [--n-per-class 64]

The real path of `tests/test_workpool.py`: a Prefect server and an MLflow server as processes, a
`process` work pool, the deployment `r2m-train-specialist/pool` (`python -m flows.pool deploy`),
the watcher (`flows.continual.watch`) as its own process with `flow.work_pool` set, r2m-tiny
(`pretrained: null`) on two new generator datasets, torch at 1 thread in every process
(OMP_NUM_THREADS=1). Three modes, each with fresh datasets (other seeds: nothing is reused):

- in-process: no pool (`flow.work_pool: null`, the default): the watcher trains both itself;
- sequential: ONE worker (`--limit 1`): the backlog trains one after the other;
- parallel: TWO workers (`--limit 1` each): one training per worker.

Per mode: the watcher's wall time (scan → both specialists → both gated re-merges → release), the
trainings' makespan (first training flow run started → last one ended, from Prefect), each
training's own span (recorded by the worker in its MLflow run: `r2m.train_span`) and the load
average. Writes bench/results/workpool_bench.{json,md} and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "src"), str(REPO)]

from fixtures import add  # noqa: E402
from servers import mlflow_server  # noqa: E402
from test_workpool import (  # noqa: E402
    DEPLOYMENT,
    PARAMS,
    POOL,
    prefect_server,
    read_flow_runs,
    start,
    start_workers,
    stop,
)


# the watcher's own task runs (not the placeholders that link the training flow runs as subflows)
LOOP_TASKS = ("theta0", "scan", "train-", "accepted-specialists", "onboard-", "all-in-one", "remerge", "release-",
              "champion")


@dataclass
class Tracking:
    tracking_uri: str
    env: dict


@contextmanager
def local_tracking(work: Path) -> Iterator[Tracking]:
    """`mlflow server` (tests/servers.py) on SQLite, artifacts proxied to a folder: the same for every mode."""
    with mlflow_server(f"sqlite:///{work / 'mlflow.db'}", str(work / "artifacts"), {}, work) as uri:
        yield Tracking(uri, {"MLFLOW_TRACKING_URI": uri})


def run_mode(mode: str, n_workers: int, seeds: tuple[int, int], args, tracking, pool, work: Path) -> dict:
    """One watcher run on two new datasets; `n_workers` = 0: no pool (`flow.work_pool: null`)."""
    project = work / mode
    project.mkdir()
    params = {**PARAMS, "train": {**PARAMS["train"], "epochs": args.epochs}}
    if n_workers == 0:
        params["flow"] = {**params["flow"], "work_pool": None}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    root = project / "data" / "generators"
    add(root, f"{mode}-a", family="FS", seed=seeds[0], n_per_class=args.n_per_class)
    add(root, f"{mode}-b", family="FR", seed=seeds[1], n_per_class=args.n_per_class)
    add(root, f"{mode}-un", role="unseen", family="other", seed=seeds[0] + 100)
    env = start_workers(pool, project, tracking.env, n=n_workers)
    try:
        if n_workers:
            deployed = subprocess.run([sys.executable, "-m", "flows.pool", "deploy", "--source", str(REPO)],
                                      env=env, cwd=project, capture_output=True, text=True, timeout=300)
            if deployed.returncode != 0:
                raise SystemExit(deployed.stdout + deployed.stderr)
            time.sleep(5)  # the workers have started polling
        load_before = os.getloadavg()
        began = time.time()
        log = project / "watch.log"
        watcher = start([sys.executable, "-c", "from flows.continual import watch; watch()"], log, env, project)
        try:
            watcher.wait(timeout=3600)
        finally:
            stop(watcher)
        ended = time.time()
        if watcher.returncode != 0:
            raise SystemExit(f"{mode}: the watcher failed:\n{log.read_text()[-4000:]}")
    finally:
        for name in list(pool.workers):
            stop(pool.workers.pop(name))

    timeline = watcher_timeline(pool, began)
    result = {"mode": mode, "workers": n_workers, "watcher_s": round(ended - began, 1), "timeline": timeline,
              "load_avg_before": [round(x, 2) for x in load_before],
              "load_avg_after": [round(x, 2) for x in os.getloadavg()]}
    if n_workers == 0:  # trained inside the onboard-<dataset> tasks, one after the other
        onboard = [t for t in timeline if t["task"].startswith("onboard-")]
        result["trainings"] = {t["task"].removeprefix("onboard-"): {"train_s": round(t["end_s"] - t["start_s"], 1),
                                                                     "train_cpu_s": "-", "flow_run_s": "-"}
                               for t in onboard}
        result["trainings_makespan_s"] = round(onboard[-1]["end_s"] - onboard[0]["start_s"], 1)
        return result

    runs, logs = read_flow_runs(pool)
    mine = [r for r in runs if r.parameters.get("generator", "").startswith(f"{mode}-")]
    starts = [r.start_time.timestamp() for r in mine]
    ends = [r.end_time.timestamp() for r in mine]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri)
    experiment = client.get_experiment_by_name("r2m-specialists").experiment_id
    spans = {}
    for r in mine:
        [found] = client.search_runs([experiment], filter_string=f"tags.`r2m.prefect_flow_run` = '{r.id}'")
        s, e, cpu = json.loads(found.data.tags["r2m.train_span"])
        spans[r.parameters["generator"]] = {
            "train_s": round(e - s, 1), "train_cpu_s": cpu, "start_s": round(s - began, 1), "end_s": round(e - began, 1),
            "flow_run_s": round(r.end_time.timestamp() - r.start_time.timestamp(), 1),
            "flow_run_start_s": round(r.start_time.timestamp() - began, 1)}
    result.update(trainings=spans, trainings_makespan_s=round(max(ends) - min(starts), 1))
    return result


def watcher_timeline(pool, began: float) -> list[dict]:
    """The newest r2m-watch flow run's task runs: name, start and end (s after the watcher started)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: pool.api_url}):
        with get_client(sync_client=True) as client:
            [watch] = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["r2m-watch"])),
                                            sort=FlowRunSort.START_TIME_DESC, limit=1)
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[watch.id])))
    rows = [{"task": "r2m-watch (flow run)", "start_s": watch.start_time.timestamp() - began,
             "end_s": watch.end_time.timestamp() - began}]
    rows += [{"task": t.name, "start_s": t.start_time.timestamp() - began, "end_s": t.end_time.timestamp() - began}
             for t in tasks if t.start_time and t.end_time and t.name.startswith(LOOP_TASKS)]
    return [{**r, "start_s": round(r["start_s"], 1), "end_s": round(r["end_s"], 1)}
            for r in sorted(rows, key=lambda r: r["start_s"])]


def markdown(result: dict) -> str:
    seq, par, local = result["sequential"], result["parallel"], result["in-process"]
    lines = [
        "# Work-pool backlog: two specialists, one worker vs two (bench/workpool_bench.py)",
        "",
        f"Machine: {result['machine']}; r2m-tiny, {result['epochs']} epochs, {result['n_per_class']} images per "
        "class per dataset, torch 1 thread per process; Prefect server + MLflow server (SQLite) on loopback.",
        "",
        "| mode | workers | watcher wall (s) | trainings makespan (s) | each training: train wall / CPU / flow run (s) |",
        "|---|---|---|---|---|",
    ]
    for m in (local, seq, par):
        each = ", ".join(f"{g}: {t['train_s']} / {t['train_cpu_s']} / {t['flow_run_s']}"
                         for g, t in sorted(m["trainings"].items()))
        lines.append(f"| {m['mode']} | {m['workers']} | {m['watcher_s']} | {m['trainings_makespan_s']} | {each} |")
    for m in (local, seq, par):
        lines += ["", f"{m['mode']}: the watcher's task runs (s after the watcher process started)", "",
                  "| task | start | end |", "|---|---|---|"]
        lines += [f"| {t['task']} | {t['start_s']} | {t['end_s']} |" for t in m["timeline"]]
        lines += [f"| training {g} (worker) | {t['start_s']} | {t['end_s']} |" for g, t in sorted(m["trainings"].items())
                  if "start_s" in t]
    lines += [
        "",
        f"Parallel saved {seq['watcher_s'] - par['watcher_s']:.1f} s of the watcher's wall time "
        f"({par['watcher_s'] / seq['watcher_s']:.2f}x) and {seq['trainings_makespan_s'] - par['trainings_makespan_s']:.1f} s "
        f"of the trainings' makespan ({par['trainings_makespan_s'] / seq['trainings_makespan_s']:.2f}x). "
        f"In-process (no pool, `flow.work_pool: null`): watcher {local['watcher_s']} s; its makespan is from the "
        "first onboard task's start to the last one's end (training + check + registration, with the step between).",
        f"Load average (1/5/15 min) before the runs: sequential {seq['load_avg_before']}, "
        f"parallel {par['load_avg_before']}. A training's CPU seconds near its wall seconds: it had a "
        "core to itself; well below: it shared one with other processes on the machine.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--n-per-class", type=int, default=64)
    parser.add_argument("--out", default=str(HERE / "results" / "workpool_bench"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="r2m-workpool-bench-") as tmp:
        work = Path(tmp)
        (work / "mlflow").mkdir()
        (work / "prefect").mkdir()
        with local_tracking(work / "mlflow") as tracking, prefect_server(work / "prefect") as pool:
            result = {
                "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.python_version()}",
                "epochs": args.epochs, "n_per_class": args.n_per_class, "pool": POOL, "deployment": DEPLOYMENT,
                "in-process": run_mode("in-process", 0, (21, 22), args, tracking, pool, work),
                "sequential": run_mode("sequential", 1, (1, 2), args, tracking, pool, work),
                "parallel": run_mode("parallel", 2, (11, 12), args, tracking, pool, work),
            }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
