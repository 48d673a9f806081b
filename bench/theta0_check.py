"""Does the gate pass from this θ0? The loop's merge → evaluate → gate step, without MLflow.

For one θ0 (a weights file, or the seeded init, or proxy pretraining from `--pretrain`):
fine-tune one specialist per seen dataset with the params.yaml recipe (`train_specialist`),
merge them with R²M and every baseline, hyperparameters chosen on the seen validation splits
exactly as `r2m run` does (`r2m.pipeline.candidate.merge_methods`), and judge each method on
every test split with the gate of params.yaml (`r2m.evaluation.judge`, the loop's own path).
Prints one line per method (DROP_max and macro GAIN with 95 % intervals, verdict) and writes
`<out>/result.json`.

    .venv/bin/python bench/theta0_check.py --data data/generators --out /tmp/t0/forensic \\
        --theta0 src/r2m/models/weights/r2m-tiny-forensic.safetensors
    .venv/bin/python bench/theta0_check.py --data data/generators --out /tmp/t0/random   # seeded init
    .venv/bin/python bench/theta0_check.py --data data/generators --out /tmp/t0/pt \\
        --pretrain '{"enabled": true, "tasks": ["manipulation", "masked"], "epochs": 20}' --save-theta0 /tmp/t0/pt.safetensors

Reuses specialists already in `--out`. Torch runs at `--threads` threads (CUDA when present).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from r2m.checkpoint import read_meta, sidecar_path
from r2m.config import load_params
from r2m.data import discover_datasets, validate_dataset
from r2m.evaluation.judge import judge
from r2m.evaluation.protocol import Roles
from r2m.models import ensure_pretrained
from r2m.names import specialist_name
from r2m.pipeline.candidate import merge_methods
from r2m.training import train_specialist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="data root with seen and unseen datasets")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--theta0", type=Path, default=None, help="θ0 weights file (model.pretrained); default: params.yaml's")
    ap.add_argument("--pretrain", default=None, help="JSON: the pretrain section (with no --theta0)")
    ap.add_argument("--save-theta0", type=Path, default=None, help="copy the θ0 used here to this file")
    ap.add_argument("--model", default="{}", help="JSON: overrides of the model section (e.g. lr)")
    ap.add_argument("--train", default="{}", help="JSON: overrides of the train section (e.g. epochs)")
    ap.add_argument("--merge", default="{}", help='JSON: overrides of the merge section (e.g. a wider grid: {"grid": {"alpha": [...], "rank": [...]}})')
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loop", action="store_true",
                    help="also replay the loop's one-at-a-time steps (R²M, onboarding order, gated against the champion of that moment)")
    ap.add_argument("--loop-only", action="store_true", help="with --loop: skip the all-methods merge of every specialist")
    ap.add_argument("--data-seed", default=None, help="a label for the result (e.g. the demo seed the data was built with)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    repo = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    model = repo.model.model_dump() | json.loads(args.model)
    if args.theta0 is not None:
        model["pretrained"] = str(args.theta0.resolve())
    overrides = dict(
        root=args.out,
        paths={"artifacts": str(args.out / "artifacts"), "data_root": str(args.data)},
        model=model,
        train=repo.train.model_dump() | json.loads(args.train),
        merge=repo.merge.model_dump() | json.loads(args.merge),
    )
    if args.pretrain is not None:
        overrides["pretrain"] = json.loads(args.pretrain)
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", **overrides)
    datasets = [validate_dataset(folder, args.data, params.data) for folder in discover_datasets(args.data)]
    seen = [d for d in datasets if d.role == "seen"]
    unseen = [d for d in datasets if d.role != "seen"]

    t0 = time.perf_counter()
    theta0 = ensure_pretrained(params)
    timings = {"theta0": time.perf_counter() - t0}
    if args.save_theta0 is not None:
        args.save_theta0.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(theta0, args.save_theta0)
        shutil.copyfile(sidecar_path(theta0), sidecar_path(args.save_theta0))
    print(f"θ0 {theta0} ({timings['theta0']:.1f} s): {read_meta(theta0).get('pretraining', {}).get('history', [])[::4]}")

    t0 = time.perf_counter()
    specialists, val_auc = {}, {}
    for ds in seen:
        out = args.out / "specialists" / f"{ds.name}.safetensors"
        if not out.is_file():
            train_specialist([ds], params, out, pretrained=theta0, progress=False)
        specialists[ds.name] = out
        val_auc[ds.name] = read_meta(out).get("metrics", {}).get("val_auc")
    timings["specialists"] = time.perf_counter() - t0
    print("specialists' own val AUC:", {k: round(v, 3) for k, v in val_auc.items() if v is not None})

    if args.loop_only:
        steps = replay_loop(params, theta0, specialists, seen, unseen, args.out / "loop")
        (args.out / "result.json").write_text(json.dumps({"val_auc": val_auc, "timings_s": timings, "loop": steps}, indent=2, default=str))
        return
    t0 = time.perf_counter()
    merged, selection = merge_methods(params, theta0, list(specialists.values()), seen, args.out / "merged")
    timings["merge"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    names = [specialist_name(n) for n in specialists]
    models = dict(zip(names, specialists.values())) | merged
    method = params.merge.method
    verdict = judge(models, [*seen, *unseen], params, Roles(method, tuple(names), compared=tuple(m for m in merged if m != method)),
                    progress=False)
    timings["evaluate"] = time.perf_counter() - t0

    result = {"theta0": str(theta0), "theta0_meta": read_meta(theta0), "params": {"model": params.model.model_dump(mode="json"), "train": params.train.model_dump(mode="json")},
              "val_auc": val_auc, "timings_s": timings, "auc": verdict.evaluation.auc(), "methods": {}}
    print(f"{'method':<6} {'hparams':<55} {'DROP_max [95 %]':>24} {'GAIN_macro [95 %]':>26}  gate")
    for name, path in merged.items():
        own = judge(models, [*seen, *unseen], params, Roles(name, tuple(names)), progress=False) if name != method else verdict
        s = own.summary
        hparams = read_meta(path).get("hparams") or {}
        print(f"{name:<6} {json.dumps(hparams)[:55]:<55} {_ci(s.drop_max, s.interval('drop_max')):>24} "
              f"{_ci(s.gain_macro, s.interval('gain_macro')):>26}  {'PASS' if own.passed else 'fail: ' + own.gate.reason[:80]}")
        result["methods"][name] = {"hparams": hparams, "summary": s.as_dict(), "gate_passed": own.passed,
                                   "gate_reason": own.gate.reason, "selection": selection.get(name)}
    if args.loop:
        result["loop"] = replay_loop(params, theta0, specialists, seen, unseen, args.out / "loop")
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})
    (args.out / "result.json").write_text(json.dumps(result, indent=2, default=str))


def _ci(value, interval) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def replay_loop(params, theta0, specialists: dict, seen, unseen, folder: Path) -> list[dict]:
    """The loop's steps without MLflow: after each specialist (onboarding order = name order, as
    the scan), R²M over the first N chosen on their validation splits, judged on their test
    splits and every unseen set against the champion of that moment (the last step that passed),
    by the loop's own `judge`."""
    champion, steps = None, []
    order = sorted(specialists)
    by_name = {d.name: d for d in seen}
    method = params.merge.method
    for n in range(1, len(order) + 1):
        first = order[:n]
        step_dir = folder / f"n{n}"
        merged, selection = merge_methods(params, theta0, [specialists[g] for g in first], [by_name[g] for g in first],
                                          step_dir, baselines=False)
        table = selection.get(method) or []
        val_score = max((row["score"] for row in table), default=None)
        names = [specialist_name(g) for g in first]
        models = dict(zip(names, (specialists[g] for g in first))) | {"candidate": merged[method]}
        kinds = {}
        if champion is not None:
            models["champion"], kinds["champion"] = champion, "champion"
        verdict = judge(models, [*[by_name[g] for g in first], *unseen], params,
                        Roles("candidate", tuple(names), "champion" if champion is not None else None),
                        kinds=kinds, progress=False, score_cache=folder / "scores")
        if verdict.passed:
            champion = merged[method]
        hparams = read_meta(merged[method]).get("hparams") or {}
        steps.append({"n": n, "added": first[-1], "hparams": hparams, "val_mean_auc": val_score,
                      "passed": verdict.passed, "reason": verdict.gate.reason, "warnings": list(verdict.gate.warnings),
                      "summary": verdict.summary.as_dict(), "auc": verdict.evaluation.auc()["candidate"],
                      "selection": table})
        print(f"loop v{n} (+{first[-1]}) {json.dumps(hparams)} val {val_score}: {verdict.gate.reason}", flush=True)
    return steps


if __name__ == "__main__":
    main()
