"""`r2m import-checkpoint` and `r2m register-specialist`: checkpoints r2m did not train (issue 12)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from r2m.cli import command


@command("import-checkpoint")
def import_checkpoint(
    src: Path = typer.Argument(..., help="Checkpoint file (.safetensors; .pth/.pt/.bin read with weights_only=True) or a Hugging Face model folder."),
    fmt: str = typer.Option(..., "--format", help="open_clip | hf-clip | deepfakebench."),
    out: Path = typer.Option(..., "--out", help="Contract checkpoint to write (.safetensors; sidecar <out>.json)."),
    pretrained: Optional[Path] = typer.Option(
        None, "--pretrained", help="θ0 (an r2m or imported file) this specialist was fine-tuned from: recorded by sha256, architecture taken from it."),
    head: Optional[Path] = typer.Option(
        None, "--head", help="The specialist's linear head (one Linear: weight [2 or 1, width], bias), for formats without one."),
    act: Optional[str] = typer.Option(
        None, "--act", help="quick_gelu (OpenAI CLIP weights) | gelu; default: the source's config, θ0 or --model."),
    heads: Optional[int] = typer.Option(None, "--heads", help="Attention heads; default: the source's config, θ0 or --model."),
    model: Optional[str] = typer.Option(
        None, "--model", help="An open_clip config the tower is an instance of (e.g. ViT-B-16-quickgelu), for heads and activation."),
    hf_config: Optional[Path] = typer.Option(
        None, "--config", help="hf-clip: the model's config.json (default: config.json in a model folder)."),
    generator: Optional[str] = typer.Option(None, "--generator", help="The generator a specialist was trained for (recorded)."),
) -> None:
    """Write a checkpoint made elsewhere in r2m's checkpoint contract, for θ0 or a specialist.

    Formats: open_clip (a whole CLIP state dict or its visual tower), hf-clip (Hugging Face CLIP
    vision weights, transformers 4 or 5 layout; visual_projection dropped), deepfakebench (its
    CLIP detector: backbone.* + head.*, DataParallel's module. accepted). The sidecar carries the
    open_clip model config, so `r2m evaluate`, `r2m export` and `r2m merge` take the result alone.
    Without a head the file is a θ0; with one (and --pretrained) a specialist.
    """
    from r2m.errors import CheckpointError
    from r2m.models.imports import import_checkpoint as run_import
    from r2m.models.imports import write_imported

    if out.resolve() == src.resolve():
        raise CheckpointError(out, "the output would overwrite the source")
    imported = run_import(src, fmt, head=head, pretrained=pretrained, heads=heads, act=act, model_name=model,
                          hf_config=hf_config, generator=generator)
    sha = write_imported(imported, out)
    typer.echo(f"{imported.kind} {out} (sha256 {sha[:12]}): {imported.architecture.describe()}, model {imported.model['name']}"
               + (f", θ0 {imported.meta['theta0_sha256'][:12]}" if "theta0_sha256" in imported.meta else ""))
