"""Do the loop's verdicts survive a rerun? The embedded default's loop replayed for several
training seeds (`train.seed`), everything else fixed (data, θ0, recipe, merge grid, gate).

For each seed: one specialist per seen dataset trained with that seed (`train_specialist`, the
loop's own function), then the loop's one-at-a-time steps replayed exactly as `r2m run` takes
them (`bench/theta0_check.py`'s `replay_loop`: R²M or hierarchical R²M over the first N in
onboarding order, chosen on their validation splits, judged by `r2m.evaluation.judge` against
the champion of that moment). Reports per step the verdict of every seed, the spread
(min / max / standard deviation across seeds) of every gate number, and whether the outcome
(each step's verdict and the final champion) is the same for all seeds.

    .venv/bin/python bench/seed_spread.py --data data/generators --out /tmp/seeds            # seeds 1024 1 2
    .venv/bin/python bench/seed_spread.py --data data/generators --out /tmp/seeds --seeds 1024 7

Writes `<out>/seed_spread.json` and `<out>/seed_spread.md`. Specialists already in
`<out>/seed-<s>/specialists/` are reused. Torch at `--threads` threads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

from r2m.config import load_params
from r2m.data import discover_datasets, validate_dataset
from r2m.models import ensure_pretrained
from r2m.training import train_specialist

RULES = ("max_drop", "min_gain_macro", "max_regression", "max_regression_unseen", "min_auc")


def _theta0_check():
    spec = importlib.util.spec_from_file_location("theta0_check", Path(__file__).with_name("theta0_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_seed(seed: int, data: Path, out: Path, merge: dict, train: dict) -> dict:
    repo = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    folder = out / f"seed-{seed}"
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", root=folder,
                         paths={"artifacts": str(folder / "artifacts"), "data_root": str(data)},
                         train=repo.train.model_dump() | train | {"seed": seed},
                         merge=repo.merge.model_dump() | merge)
    datasets = [validate_dataset(f, data, params.data) for f in discover_datasets(data)]
    seen = [d for d in datasets if d.role == "seen"]
    unseen = [d for d in datasets if d.role != "seen"]
    theta0 = ensure_pretrained(params, progress=False)
    started = time.perf_counter()
    specialists = {}
    for ds in seen:
        path = folder / "specialists" / f"{ds.name}.safetensors"
        if not path.is_file():
            train_specialist([ds], params, path, pretrained=theta0, progress=False)
        specialists[ds.name] = path
    trained = time.perf_counter() - started
    steps = _theta0_check().replay_loop(params, theta0, specialists, seen, unseen, folder / "loop")
    champion = max((s["n"] for s in steps if s["passed"]), default=None)
    return {"seed": seed, "train_seconds": trained, "replay_seconds": time.perf_counter() - started - trained,
            "champion": champion, "steps": steps}


def rule_values(step: dict) -> dict[str, float]:
    s = step["summary"]
    values = {"max_drop": s.get("drop_max"), "min_gain_macro": s.get("gain_macro"),
              "max_regression": s.get("regression_max"), "max_regression_unseen": s.get("regression_unseen_macro"),
              "min_auc": min(s["seen_auc"].values()) if s.get("seen_auc") else None}
    return {k: v for k, v in values.items() if v is not None}


def report(runs: list[dict]) -> tuple[str, dict]:
    n_steps = max(len(r["steps"]) for r in runs)
    lines = ["| step | added | verdicts (" + ", ".join(f"seed {r['seed']}" for r in runs) + ") | "
             + " | ".join(RULES) + " |", "|---|---|---|" + "---|" * len(RULES)]
    spread = {}
    for i in range(n_steps):
        steps = [r["steps"][i] for r in runs if i < len(r["steps"])]
        verdicts = ", ".join("pass" if s["passed"] else "FAIL" for s in steps)
        cells = []
        for rule in RULES:
            values = [rule_values(s)[rule] for s in steps if rule in rule_values(s)]
            if not values:
                cells.append("–")
                continue
            sd = statistics.pstdev(values) if len(values) > 1 else 0.0
            spread.setdefault(steps[0]["n"], {})[rule] = {"min": min(values), "max": max(values), "sd": sd, "values": values}
            cells.append(f"{min(values):.3f} … {max(values):.3f} (sd {sd:.3f})")
        lines.append(f"| v{steps[0]['n']} | {steps[0]['added']} | {verdicts} | " + " | ".join(cells) + " |")
    patterns = {tuple(s["passed"] for s in r["steps"]) for r in runs}
    champions = {r["champion"] for r in runs}
    same = len(patterns) == 1 and len(champions) == 1
    lines += ["", "champion per seed: " + ", ".join(f"seed {r['seed']}: v{r['champion']}" for r in runs),
              f"outcome the same for every seed (each step's verdict and the champion): {'yes' if same else 'NO'}",
              "cells: min … max (population sd) of the gate rule's value across seeds"]
    return "\n".join(lines) + "\n", {"same_outcome": same, "spread": spread}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="data root (the embedded benchmark)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1024, 1, 2])
    ap.add_argument("--merge", default="{}", help="JSON: overrides of the merge section (default: params.yaml's)")
    ap.add_argument("--train", default="{}", help="JSON: overrides of the train section (default: params.yaml's)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = []
    for seed in args.seeds:
        runs.append(run_seed(seed, args.data, args.out, json.loads(args.merge), json.loads(args.train)))
        print(f"seed {seed}: champion v{runs[-1]['champion']}, steps "
              + " ".join("P" if s["passed"] else "F" for s in runs[-1]["steps"]), flush=True)
    table, summary = report(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seed_spread.md").write_text(table)
    (args.out / "seed_spread.json").write_text(json.dumps({"runs": runs, **summary}, indent=2, default=str))
    print(table)


if __name__ == "__main__":
    main()
