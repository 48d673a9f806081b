"""The one-at-a-time curve (paper Fig. 6/7 shape): DROP_max and macro GAIN of every method at N = 1..K,
with R²M both flat and hierarchical (by forgery family).

On a project the loop has run (`make run`): its θ0 and its accepted specialists in onboarding
order (registry order), merged with R²M and every baseline at each N = 1..K over the first N,
hyperparameters chosen on the first N seen validation splits exactly as `r2m run` chooses them
(`r2m.pipeline.candidate.merge_methods`), scored on the first N seen test splits and every unseen
set (`evaluate_models`, sharing the loop's score cache), and gated with params.yaml's thresholds
against no champion. Both R²M core readings are reported at every N with their diagnostics, and R²M
in the other arrangement (`r2m-family`: hierarchical by forgery family when the project merges
flat; `r2m-flat` otherwise), its level-2 point chosen on the same validation splits.
Writes `<out>/curve.json`, `<out>/curve.md` and `<out>/curve.png`, and logs them as one MLflow run
`one-at-a-time curve` in the experiment `r2m-merges`.

    .venv/bin/python bench/merge_curve.py --project . --out reports/curve
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from r2m.checkpoint import read_meta
from r2m.config import load_params
from r2m.data import discover_datasets, validate_dataset
from r2m.evaluation.judge import judge
from r2m.evaluation.protocol import Roles
from r2m.merging.files import merge_files
from r2m.models import ensure_pretrained
from r2m.names import specialist_name
from r2m.pipeline.candidate import merge_methods
from r2m.pipeline.specialists import registered_specialists
from r2m.tracking import mlflow_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", type=Path, default=Path("."), help="project root the loop ran in")
    ap.add_argument("--out", type=Path, default=Path("reports/curve"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-mlflow", action="store_true", help="do not log the curve as an MLflow run")
    ap.add_argument("--max-n", type=int, default=None, help="stop at the first N specialists (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(root=args.project.resolve())
    root = params.path("data_root")
    datasets = {d.name: d for d in (validate_dataset(f, root, params.data) for f in discover_datasets(root))}
    unseen = [d for d in datasets.values() if d.role != "seen"]
    client = mlflow_store.client(params)
    seen_names = sorted(n for n, d in datasets.items() if d.role == "seen")
    specialists = sorted(registered_specialists(params, seen_names, client), key=lambda s: s.registered_at)[:args.max_n]
    theta0 = ensure_pretrained(params, progress=False)
    cache = params.path("artifacts") / "scores"
    rows, started = [], time.perf_counter()
    for n in range(1, len(specialists) + 1):
        first = specialists[:n]
        seen = [datasets[s.generator] for s in first]
        folder = args.out / f"n{n}"
        merged, _ = merge_methods(params, theta0, [s.path for s in first], seen, folder)
        # R²M's other arrangement (flat if the project merges hierarchically, else by family), chosen the same way
        other_arrangement = "none" if params.merge.hierarchy != "none" else "family"
        alt = params.model_copy(update={"merge": params.merge.model_copy(update={"hierarchy": other_arrangement})})
        (alt_path,) = merge_methods(alt, theta0, [s.path for s in first], seen, folder / "alt", baselines=False)[0].values()
        merged["r2m-flat" if other_arrangement == "none" else "r2m-family"] = alt_path
        # the other R²M core reading at the hyperparameters the selection chose for this one
        chosen = read_meta(merged["r2m"]).get("hparams") or {}
        if n > 1 and chosen:
            other = "uncentered" if chosen.get("core") == "centered" else "centered"
            merged["r2m-" + other] = folder / f"r2m-{other}.safetensors"
            merge_files("r2m", theta0, [s.path for s in first], merged["r2m-" + other], {**chosen, "core": other})
        names = [specialist_name(s.generator) for s in first]
        models = dict(zip(names, (s.path for s in first))) | merged
        for method, path in merged.items():  # each method judged on its own, as the loop judges R²M
            verdict = judge(models, [*seen, *unseen], params, Roles(method, tuple(names)), progress=False,
                            score_cache=cache)
            summary, gate = verdict.summary, verdict.gate
            meta = read_meta(path)
            diag = meta.get("diagnostics") or {}
            rows.append({
                "n": n, "method": method, "added": first[-1].generator, "hparams": meta.get("hparams"),
                "drop_max": summary.drop_max, "drop_max_ci": summary.interval("drop_max"),
                "gain_macro": summary.gain_macro, "gain_macro_ci": summary.interval("gain_macro"),
                "gate_passed": gate.passed, "gate_reason": gate.reason,
                "core_ratio": diag.get("core_ratio"), "cos_v_tau_bar": diag.get("cos_v_tau_bar"),
                "eta": diag.get("eta"),
            })
        print(f"N={n} (+{first[-1].generator}): " + "  ".join(
            f"{r['method']} {r['drop_max']:.3f}/{r['gain_macro']:+.3f}{'*' if r['gate_passed'] else ''}"
            for r in rows if r["n"] == n), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curve.json").write_text(json.dumps(rows, indent=2, default=str))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["n"] == len(specialists)))
    lines = ["| N | added | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for n in range(1, len(specialists) + 1):
        cells = []
        for m in methods:
            r = next((r for r in rows if r["n"] == n and r["method"] == m), None)
            cells.append("" if r is None else _cell(r))
        lines.append(f"| {n} | {specialists[n - 1].generator} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + ("\n\ncell: DROP_max [95 % interval] / macro GAIN [95 % interval]; ✓ = passes the "
                                 "gate's DROP, GAIN and AUC rules (no champion)\n")
    (args.out / "curve.md").write_text(table)
    _plot(rows, methods, args.out / "curve.png")
    print(table, f"\n{time.perf_counter() - started:.0f} s")
    if not args.no_mlflow:
        _log(params, client, args.out, rows)


def _cell(r: dict) -> str:
    def ci(v) -> str:
        return f" [{v[0]:.3f}, {v[1]:.3f}]" if v else ""

    return (f"{r['drop_max']:.3f}{ci(r['drop_max_ci'])} / {r['gain_macro']:+.3f}{ci(r['gain_macro_ci'])}"
            + (" ✓" if r["gate_passed"] else ""))


def _plot(rows: list[dict], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m in methods:
        pts = [r for r in rows if r["method"] == m]
        for ax, key in ((axes[0], "drop_max"), (axes[1], "gain_macro")):
            ys = [r[key] for r in pts]
            err = [[y - (r[key + "_ci"] or (y, y))[0] for y, r in zip(ys, pts)],
                   [(r[key + "_ci"] or (y, y))[1] - y for y, r in zip(ys, pts)]]
            ax.errorbar([r["n"] for r in pts], ys, yerr=err, marker="o", capsize=2, label=m)
    axes[0].set(xlabel="N specialists merged", ylabel="DROP_max (seen, lower is better)")
    axes[1].set(xlabel="N specialists merged", ylabel="macro GAIN (unseen, higher is better)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _log(params, client, out: Path, rows: list[dict]) -> None:
    experiment = client.get_experiment_by_name("r2m-merges")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("r2m-merges")
    run = client.create_run(experiment_id, run_name="one-at-a-time curve", tags={"kind": "curve"})
    for r in rows:
        if r["drop_max"] is not None:
            client.log_metric(run.info.run_id, f"curve/{r['method']}/drop_max", r["drop_max"], step=r["n"])
        if r["gain_macro"] is not None:
            client.log_metric(run.info.run_id, f"curve/{r['method']}/gain_macro", r["gain_macro"], step=r["n"])
    for name in ("curve.json", "curve.md", "curve.png"):
        client.log_artifact(run.info.run_id, str(out / name), "curve")
    client.set_terminated(run.info.run_id)


if __name__ == "__main__":
    main()
