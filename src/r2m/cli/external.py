"""`r2m import-checkpoint` and `r2m register-specialist`: checkpoints r2m did not train (docs/usage.md,
"Bring your own specialists")."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from r2m.cli.app import command
from r2m.names import specialist_name


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
    heads: Optional[int] = typer.Option(
        None, "--heads", help="Attention heads (≥ 1); default: the source's config, θ0 or --model (DeepfakeBench: width/64, "
                              "printed as an assumption)."),
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
    Without a head the file is a θ0; with one (and --pretrained) a specialist. What the file does
    not record and had to be assumed (a DeepfakeBench file's heads and activation) is printed on
    stderr, one line each with the flag that overrides it, and recorded in the sidecar's `assumed`.
    """
    from r2m.errors import CheckpointError, check_output_file
    from r2m.models.imports import import_checkpoint as run_import
    from r2m.models.imports import write_imported

    check_output_file(out, CheckpointError)  # a folder, or a path under a file: refused before any work
    if _resolved(out) == _resolved(src):
        raise CheckpointError(out, "the output would overwrite the source")
    imported = run_import(src, fmt, head=head, pretrained=pretrained, heads=heads, act=act, model_name=model,
                          hf_config=hf_config, generator=generator)
    for _, line in imported.assumed.values():  # what no file and no flag said: the user must see it
        typer.echo(f"r2m import-checkpoint: assumption: {line}", err=True)
    sha = write_imported(imported, out)
    typer.echo(f"{imported.kind} {out} (sha256 {sha[:12]}): {imported.architecture.describe()}, model {imported.model['name']}"
               + (f", θ0 {imported.meta['theta0_sha256'][:12]}" if "theta0_sha256" in imported.meta else ""))


def _resolved(path: Path) -> Path:
    """`path` with its links followed; a symlink loop is a CheckpointError naming it."""
    from r2m.errors import CheckpointError

    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python 3.11's "Symlink loop"; OSError (ELOOP) from 3.13
        raise CheckpointError(path, "a symlink loop: it leads to no file") from None


@command("register-specialist")
def register_specialist(
    checkpoint: Path = typer.Argument(..., help="The specialist (.safetensors in the checkpoint contract; see import-checkpoint)."),
    generator: str = typer.Option(..., "--generator", help="The seen generator dataset (under the data root) it was trained for."),
    assume_theta0: bool = typer.Option(
        False, "--assume-theta0", help="For a file without a θ0 record: it was fine-tuned from the loop's θ0 (recorded as assumed)."),
    params_file: Optional[Path] = typer.Option(None, "--params", help="params.yaml to read (default: the project's)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Hand the continual loop a specialist trained elsewhere for one generator dataset.

    It gets the checks one r2m trained gets — the loop's θ0 (by sha256, or --assume-theta0), its
    own validation AUC on that dataset, the label-flip guard — and is registered as a version of
    specialist-<generator> with its verdict. Accepted, the next `r2m run` merges it (and trains no
    specialist of its own for that data). Exit status 1 when it is rejected.
    """
    from r2m.config import load_params
    from r2m.pipeline.external import register_external_specialist

    params = load_params(params_file)
    specialist, check = register_external_specialist(checkpoint, generator, params, assume_theta0=assume_theta0,
                                                     progress=not quiet)
    again = " (registered before)" if check is None else ""
    typer.echo(f"{specialist_name(specialist.generator)} v{specialist.version}: {specialist.status}{again} "
               f"(val AUC {specialist.val_auc:.4f})" + ("; the next `r2m run` merges it" if specialist.status == "accepted"
                                                        else f" — {specialist.reason}"))
    if specialist.status != "accepted":
        raise typer.Exit(code=1)
