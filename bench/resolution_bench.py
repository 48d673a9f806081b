"""What the input resolution costs: training and scoring throughput of the shipped EfficientNet-Lite0
configs at 64, 96 and 224 px, in one run, on the machine at hand. Not a test: run it by hand, on a
box with nothing else running.

    .venv/bin/python bench/resolution_bench.py            # about four minutes on 2 CPU cores

Per config: images/s of one training step (forward, backward, AdamW step; batch 16, backbone in
train mode with BatchNorm statistics frozen, as `r2m train` does) and of scoring (no grad, batch
32 on CPU), each the median of `--repeats` timed runs after a warm-up, at the thread count r2m
uses (`r2m.threads.usable_cpus()`). From those: the seconds one specialist of the embedded
benchmark takes per epoch (its 640 training and 320 validation images: model compute only, no
data loading or augmentation), and the ratio to 64 px.
The weights are the configs' random init (same shapes and FLOPs as θ0; timing only).

Writes <out>.json and <out>.md (default bench/results/resolution_bench) and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src")]

import torch  # noqa: E402

from r2m.config import ModelConfig  # noqa: E402
from r2m.models.detector import build_detector, image_size  # noqa: E402
from r2m.threads import usable_cpus  # noqa: E402
from r2m.training.specialist import freeze_norm_statistics  # noqa: E402

CONFIGS = ["r2m-efficientnet-lite0", "r2m-efficientnet-lite0-96", "r2m-efficientnet-lite0-224"]
TRAIN_IMAGES, VAL_IMAGES = 640, 320  # one seen dataset of the embedded benchmark: train and val splits


def timed(step, steps: int, repeats: int) -> float:
    """Median seconds of `steps` calls of `step`, over `repeats` runs, after one warm-up run."""
    for _ in range(max(1, steps // 2)):
        step()
    runs = []
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(steps):
            step()
        runs.append(time.perf_counter() - began)
    return statistics.median(runs)


def measure(name: str, steps: int, repeats: int) -> dict:
    torch.manual_seed(0)
    detector = build_detector(ModelConfig(name=name)).to(memory_format=torch.channels_last)
    side = image_size(name)
    train_x = torch.randn(16, 3, side, side).to(memory_format=torch.channels_last)
    train_y = torch.randint(0, 2, (16,))
    score_x = torch.randn(32, 3, side, side).to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(detector.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()  # two logits (real, fake), as training

    def train_step():
        detector.train()
        freeze_norm_statistics(detector)  # as the training recipe does
        optimiser.zero_grad(set_to_none=True)
        loss_fn(detector(train_x), train_y).backward()
        optimiser.step()

    def score_step():
        detector.eval()
        with torch.no_grad():
            detector(score_x)

    train_s = timed(train_step, steps, repeats)
    score_s = timed(score_step, steps, repeats)
    train_ips, score_ips = 16 * steps / train_s, 32 * steps / score_s
    return {"model": name, "px": side, "train_img_s": train_ips, "score_img_s": score_ips,
            "epoch_s": TRAIN_IMAGES / train_ips + VAL_IMAGES / score_ips}


def markdown(rows: list[dict], meta: dict) -> str:
    base = rows[0]["epoch_s"]
    lines = [f"Threads {meta['threads']}, torch {meta['torch']}, {meta['machine']}, {meta['date']}; "
             f"median of {meta['repeats']} runs of {meta['steps']} steps.", "",
             "| config | px | train img/s (batch 16) | score img/s (batch 32) | compute s per epoch of one specialist (640 train + 320 val images) | × 64 px |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['model']}` | {r['px']} | {r['train_img_s']:.1f} | {r['score_img_s']:.1f} | "
                     f"{r['epoch_s']:.0f} | {r['epoch_s'] / base:.1f}× |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="steps per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the median is kept)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "resolution_bench")
    args = ap.parse_args()
    threads = usable_cpus()
    torch.set_num_threads(threads)
    rows = [measure(name, args.steps, args.repeats) for name in CONFIGS]
    meta = {"threads": threads, "torch": torch.__version__, "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "repeats": args.repeats}
    text = markdown(rows, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
