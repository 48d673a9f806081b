"""What one other CPU job costs a training: one `r2m train` alone vs two at once on the same
dataset, with r2m's thread policy and with the libraries' defaults. Not a test: run it by hand,
on a box with nothing else running.

    # the full measurement (the embedded default: EfficientNet-Lite0 θ0, params.yaml's recipe)
    make demo-data
    .venv/bin/python bench/threads_bench.py --data data/generators/fs-faces --repeats 3

    # a smoke run (tiny backbone, tiny dataset; about two minutes)
    .venv/bin/r2m demo-data --out /tmp/x --size 40
    printf 'model:\\n  name: r2m-tiny\\n  pretrained: null\\ntrain:\\n  epochs: 1\\n' > /tmp/tiny.yaml
    .venv/bin/python bench/threads_bench.py --data /tmp/x/fs-faces --params /tmp/tiny.yaml --repeats 1 \\
        --wait-steps 30 --out /tmp/threads_bench_smoke

Policies (`r2m.threads`, docs/usage.md, "Running beside other jobs"):
- `r2m`: what r2m does by default: `usable_cpus()` threads for torch, OpenMP and BLAS, and
  `OMP_WAIT_POLICY=PASSIVE` set before torch is imported;
- `library`: `R2M_THREADS=library`, r2m sets nothing: torch's and OpenMP's own defaults (as many
  threads as cores, idle threads spin before they sleep): the behaviour before the policy.

Per policy and repeat: T1, the wall time of one `r2m train DATASET --out ...` alone; T2, the wall
time of two started together (until both ended). The ratio T2 / T1 is what the second job costs
(2.0 where the two share the cores fairly and nothing is wasted; the target is ≤ 2.5). Both runs
of a repeat are in the same minute, policies interleaved, so drift affects both alike; the box's
load average is recorded. Every process starts with OMP_*/MKL_*/OPENBLAS_*/KMP_*/R2M_THREADS
removed from its environment, so only the policy differs. θ0 is built once before any timing.

Wait-policy check: the CPU time one process burns for a fixed torch workload (conv forward and
backward with short serial gaps, as a training step has), with OMP_WAIT_POLICY unset, set to
PASSIVE in the environment before torch loads, and set from Python after `import torch`. It
shows which setting torch's bundled OpenMP (GNU libgomp) honours: only the one before the import.

Writes <out>.json and <out>.md (default bench/results/threads_bench) and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO / "src")]

from r2m.threads import COUNT_VARS, THREADS_ENV, WAIT_VARS, usable_cpus  # noqa: E402

POLICIES = {"r2m": {}, "library": {THREADS_ENV: "library"}}

WORKLOAD = r"""
import os, resource, sys, time
if sys.argv[1] == "after-import":
    import torch
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # too late: OpenMP read its environment when torch loaded it
else:
    import torch
torch.manual_seed(0)
x = torch.randn(64, 3, 32, 32)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3), torch.nn.Flatten(),
                          torch.nn.Linear(32 * 28 * 28, 2))
net(x).sum().backward()  # warm-up: thread pools started
t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
for _ in range(int(sys.argv[2])):
    net(x).sum().backward()
    time.sleep(0.01)  # a serial gap: data loading, Python
wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
print(f"{wall:.4f} {cpu:.4f} {torch.get_num_threads()}")
"""


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any thread setting, plus `extra`."""
    drop = {*COUNT_VARS, *WAIT_VARS, THREADS_ENV, "OMP_PROC_BIND", "OMP_PLACES", "GOMP_SPINCOUNT"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TQDM_DISABLE"] = "1"
    return {**env, **extra}


def train_cmd(data: Path, out: Path, params: Path) -> list[str]:
    return [sys.executable, "-m", "r2m.cli", "train", str(data), "--out", str(out), "--params", str(params)]


def run_together(n: int, data: Path, params: Path, env: dict, workdir: Path, tag: str) -> tuple[float, float]:
    """Start `n` trainings at once: (the wall time until the last one ended, the mean of their
    own training seconds, `metrics.train_seconds` of each sidecar: the epochs alone, without the
    process start and θ0 loading)."""
    procs, logs = [], []
    start = time.perf_counter()
    for i in range(n):
        log = open(workdir / f"{tag}-{i}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(train_cmd(data, workdir / f"{tag}-{i}.safetensors", params), env=env,
                                      cwd=workdir, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - start
    for log in logs:
        log.close()
    for i, code in enumerate(codes):
        if code != 0:
            raise SystemExit(f"{tag}-{i}: r2m train exited {code}; see {workdir / f'{tag}-{i}.log'}:\n"
                             + (workdir / f"{tag}-{i}.log").read_text()[-2000:])
    seconds = [json.loads((workdir / f"{tag}-{i}.safetensors.json").read_text())["metrics"]["train_seconds"]
               for i in range(n)]
    return wall, statistics.mean(seconds)


def wait_policy_check(steps: int) -> list[dict]:
    n = str(usable_cpus())
    rows = []
    for label, mode, extra in (("unset (libgomp's default: spin, then sleep)", "env", {}),
                               ("PASSIVE in the environment before torch loads", "env", {"OMP_WAIT_POLICY": "PASSIVE"}),
                               ("PASSIVE set from Python after `import torch`", "after-import", {})):
        env = clean_env(OMP_NUM_THREADS=n, **extra)
        proc = subprocess.run([sys.executable, "-c", WORKLOAD, mode, str(steps)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        wall, cpu, threads = proc.stdout.split()
        rows.append({"setting": label, "threads": int(threads), "wall_s": float(wall), "cpu_s": float(cpu),
                     "cpu_per_wall": float(cpu) / float(wall)})
    return rows


def markdown(report: dict) -> str:
    lines = [
        "# threads_bench: two `r2m train` at once vs one alone",
        "",
        f"{report['when']}, {report['machine']}; usable CPUs {report['usable_cpus']} (os.cpu_count {report['cpu_count']}); "
        f"load average before {report['load_before']}, after {report['load_after']}.",
        f"Dataset `{report['data']}`, params `{report['params']}`, {report['repeats']} repeat(s); command: `{report['command']}`.",
        "",
        "| policy | one alone T1 (s) | two at once T2 (s) | T2 / T1 | per repeat | training alone (s) | "
        "training, two at once (s) | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in report["policies"].items():
        per = ", ".join(f"{r:.2f}" for r in row["ratios"])
        lines.append(f"| {name} | {row['t1_median']:.1f} | {row['t2_median']:.1f} | **{row['ratio']:.2f}** | {per} | "
                     f"{row['train1_median']:.1f} | {row['train2_median']:.1f} | {row['train_ratio']:.2f} |")
    lines += ["", "T1, T2: wall time of the whole command(s); training: `metrics.train_seconds` of the sidecars "
                  "(the epochs, without process start-up), the mean of the two for two at once."]
    if "r2m" in report["policies"] and "library" in report["policies"]:
        lines += ["", f"T2 / T1 with r2m's policy {report['policies']['r2m']['ratio']:.2f} against "
                      f"{report['policies']['library']['ratio']:.2f} with the libraries' defaults "
                      "(2.0 = the second job costs exactly its share; target ≤ 2.5)."]
    if report.get("wait_policy"):
        lines += ["", "## Which OMP_WAIT_POLICY takes effect (torch's bundled OpenMP)", "",
                  f"The same workload ({report['wait_steps']} conv forward+backward steps with 10 ms serial gaps), "
                  "one process, CPU seconds burnt against wall seconds:", "",
                  "| OMP_WAIT_POLICY | threads | wall (s) | CPU (s) | CPU / wall |", "|---|---|---|---|---|"]
        for row in report["wait_policy"]:
            lines.append(f"| {row['setting']} | {row['threads']} | {row['wall_s']:.2f} | {row['cpu_s']:.2f} | {row['cpu_per_wall']:.2f} |")
    lines += ["", "Timings from one session on one box; compare ratios within this file only."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO / "data" / "generators" / "fs-faces", help="a generator dataset folder")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml", help="params.yaml for the trainings")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policies", default="r2m,library", help="comma-separated: r2m, library")
    ap.add_argument("--wait-steps", type=int, default=60, help="steps of the wait-policy check (0: skip it)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "threads_bench", help="writes <out>.json and <out>.md")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, checkpoints)")
    args = ap.parse_args()
    data, params_src = args.data.resolve(), args.params.resolve()
    if not (data / "generator.yaml").is_file():
        raise SystemExit(f"{data}: not a generator dataset (no generator.yaml); `make demo-data` builds the default one")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise SystemExit(f"--policies: unknown {unknown[0]!r} (expected {', '.join(POLICIES)})")

    workdir = Path(tempfile.mkdtemp(prefix="r2m-threads-bench-"))
    project = workdir / "project"  # θ0 and outputs live here, never in the repository's artifacts/
    project.mkdir()
    params = project / "params.yaml"
    shutil.copyfile(params_src, params)
    load_before = os.getloadavg()
    print(f"work folder {workdir}; building θ0 once ...", file=sys.stderr)
    subprocess.run([sys.executable, "-c", "from r2m.config import load_params; from r2m.models import ensure_pretrained; "
                    f"ensure_pretrained(load_params({str(params)!r}), progress=False)"],
                   env=clean_env(R2M_PROJECT_ROOT=str(project)), check=True)

    results: dict[str, dict] = {p: {"t1": [], "t2": [], "train1": [], "train2": []} for p in policies}
    for repeat in range(args.repeats):
        for policy in policies:
            env = clean_env(R2M_PROJECT_ROOT=str(project), **POLICIES[policy])
            t1, train1 = run_together(1, data, params, env, project, f"{policy}-r{repeat}-alone")
            t2, train2 = run_together(2, data, params, env, project, f"{policy}-r{repeat}-pair")
            for key, value in (("t1", t1), ("t2", t2), ("train1", train1), ("train2", train2)):
                results[policy][key].append(value)
            print(f"repeat {repeat + 1}/{args.repeats} {policy}: alone {t1:.1f} s, two at once {t2:.1f} s, "
                  f"ratio {t2 / t1:.2f}", file=sys.stderr)
    wait = wait_policy_check(args.wait_steps) if args.wait_steps > 0 else []

    report = {
        "when": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "usable_cpus": usable_cpus(), "cpu_count": os.cpu_count(),
        "load_before": " ".join(f"{x:.2f}" for x in load_before), "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "data": str(data), "params": str(params_src), "repeats": args.repeats, "command": " ".join(sys.argv),
        "policies": {}, "wait_policy": wait, "wait_steps": args.wait_steps,
    }
    for policy, r in results.items():
        t1, t2 = statistics.median(r["t1"]), statistics.median(r["t2"])
        train1, train2 = statistics.median(r["train1"]), statistics.median(r["train2"])
        report["policies"][policy] = {**r, "t1_median": t1, "t2_median": t2, "ratio": t2 / t1,
                                      "ratios": [b / a for a, b in zip(r["t1"], r["t2"])],
                                      "train1_median": train1, "train2_median": train2, "train_ratio": train2 / train1}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
