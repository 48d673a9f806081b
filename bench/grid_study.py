"""Which R²M grid should the loop search? A leave-one-family-out study on seen validation only.

The loop chooses (α, r, core) by the mean AUC on the *merged* specialists' validation splits,
which cannot see how a point transfers to generators no specialist was trained on. This study
asks that question with seen data alone: for each forgery family F, the specialists of the other
families are merged at every grid point, and each point is scored on

- the validation splits of the merged specialists' own datasets (what the loop's selection reads), and
- the validation splits of F's datasets (a family no merged specialist saw: a proxy for an unseen generator).

Averaged over the held-out families, the table shows how each α and r trades in-family
retention for transfer; the grid the loop ships is chosen from it (docs/benchmark.md). No test
split and no unseen set is read.

    .venv/bin/python bench/grid_study.py --data data/generators --specialists DIR --out /tmp/grid

`DIR` holds `<dataset>.safetensors` specialists (e.g. `bench/theta0_check.py`'s `--out/specialists`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from r2m.config import load_params
from r2m.data import discover_datasets, validate_dataset
from r2m.evaluation.metrics import auc
from r2m.evaluation.validation import ValidationScorer
from r2m.merging import select
from r2m.models import ensure_pretrained


class PerTask(ValidationScorer):
    """The loop's validation scorer, keeping each task's AUC (the loop's score is their mean)."""

    def per_task(self, state_dict) -> dict[str, float]:
        from r2m.evaluation.scoring import score_batches

        self.detector.load_checkpoint_tensors(state_dict, source="merged state dict")
        return {name: auc(labels, score_batches(self.detector, batches, self.device), name)
                for name, batches, labels in self.tasks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--specialists", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.2, 0.4, 0.5, 0.6, 0.8, 1.0, 1.3, 1.6])
    ap.add_argument("--rank", type=float, nargs="+", default=[0.005, 0.01, 0.03, 0.1, 0.3])
    ap.add_argument("--core", nargs="+", default=["centered", "uncentered"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", root=args.out,
                         paths={"artifacts": str(args.out / "artifacts"), "data_root": str(args.data)})
    seen = [d for d in (validate_dataset(f, args.data, params.data) for f in discover_datasets(args.data)) if d.role == "seen"]
    theta0 = ensure_pretrained(params, progress=False)
    families = sorted({d.family for d in seen})
    rows: dict[tuple, dict] = {}
    for held_out in families:
        merged = [d for d in seen if d.family != held_out]
        scorer = PerTask(params, seen)  # every seen val split; merged ones and held-out ones told apart below
        paths = [args.specialists / f"{d.name}.safetensors" for d in merged]
        records = []

        def score(state, hp):
            per = scorer.per_task(state)
            own = float(np.mean([per[d.name] for d in merged]))
            out = float(np.mean([per[d.name] for d in seen if d.family == held_out]))
            records.append((hp, own, out))
            return own

        select("r2m", theta0, paths, score, grid={"alpha": args.alpha, "rank": args.rank, "core": args.core})
        for hp, own, out in records:
            key = (hp["core"], hp["alpha"], hp["rank"])
            rows.setdefault(key, {"own": [], "held_out": []})
            rows[key]["own"].append(own)
            rows[key]["held_out"].append(out)
        best = max(records, key=lambda r: r[1])
        print(f"held out {held_out}: the loop's choice {best[0]['core']} α {best[0]['alpha']} r {best[0]['rank']} "
              f"(own val {best[1]:.3f}, held-out family val {best[2]:.3f})", flush=True)
    lines = ["| core | α | r | own val AUC (mean over held-out folds) | held-out family val AUC |", "|---|---|---|---|---|"]
    for (core, alpha, rank), v in sorted(rows.items()):
        lines.append(f"| {core} | {alpha:g} | {rank:g} | {np.mean(v['own']):.3f} | {np.mean(v['held_out']):.3f} |")
    by_alpha = {}
    for (core, alpha, rank), v in rows.items():
        by_alpha.setdefault((core, alpha), []).append((np.mean(v["own"]), np.mean(v["held_out"])))
    lines += ["", "| core | α | best own val AUC over r | held-out family val AUC at that r |", "|---|---|---|---|"]
    for (core, alpha), pts in sorted(by_alpha.items()):
        own, out = max(pts)
        lines.append(f"| {core} | {alpha:g} | {own:.3f} | {out:.3f} |")
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grid_study.md").write_text(table)
    (args.out / "grid_study.json").write_text(json.dumps(
        [{"core": k[0], "alpha": k[1], "rank": k[2], **v} for k, v in rows.items()], indent=2))
    print(table)


if __name__ == "__main__":
    main()
