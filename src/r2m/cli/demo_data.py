"""`r2m demo-data`: build the embedded benchmark (docs/benchmark.md)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from r2m.cli.app import command


@command("demo-data")
def demo_data(
    out: Path = typer.Option(None, "--out", help="Data root to write the datasets into (default: paths.data_root)."),
    size: int = typer.Option(None, "--size", help="Images per class per seen dataset, cut 50/25/25 by source into train/val/test (default: demo.size)."),
    unseen_size: int = typer.Option(None, "--unseen-size", help="Images per class per unseen (evaluation-only) set (default: demo.unseen_size)."),
    seed: int = typer.Option(None, "--seed", help="Random seed; same seed, same bytes (default: demo.seed)."),
    image_size: int = typer.Option(None, "--image-size", help="Side of the square images in px (default: demo.image_size)."),
    strength: float = typer.Option(None, "--strength", help="Scales every family's artifact (default: demo.strength)."),
    workers: int = typer.Option(2, "--workers", help="Processes building datasets in parallel."),
    params_file: Path = typer.Option(None, "--params", help="params.yaml to read (default: the project's)."),
) -> None:
    """Build the embedded benchmark of generator datasets from bundled real photographs.

    Writes one dataset per (generator family, real domain) in the data contract: seen families
    FS, FR, EFS and unseen families (diffusion-like, inpainting-like) over faces and scenes.
    Nothing is downloaded. See docs/benchmark.md.
    """
    from r2m.config import load_params
    from r2m.data.demo import build_demo_data

    params = load_params(params_file)
    cfg = params.demo
    out = out if out is not None else params.path("data_root")
    size = cfg.size if size is None else size
    unseen_size = cfg.unseen_size if unseen_size is None else unseen_size
    seed = cfg.seed if seed is None else seed
    image_size = cfg.image_size if image_size is None else image_size
    strength = cfg.strength if strength is None else strength
    started = time.perf_counter()
    folders = build_demo_data(out, size, seed, image_size, strength, unseen_size=unseen_size,
                              split_fractions=cfg.split_fractions, workers=workers)
    typer.echo(
        f"wrote {len(folders)} datasets ({size} real + {size} fake images per seen dataset, {unseen_size} + "
        f"{unseen_size} per unseen set, {image_size} px, seed {seed}) "
        f"to {out} in {time.perf_counter() - started:.1f} s"
    )
