"""`r2m merge`: training-free merging of specialists (docs/method.md)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from r2m.cli.app import command

# flag -> hyperparameter name, per method (a flag that does not apply is an error, not ignored)
_FLAGS = {"alpha": "--alpha", "rank": "--rank", "lam": "--lam", "top_p": "--top-p", "eta": "--eta", "eta_mode": "--eta-mode", "core": "--core", "k": "--k", "form": "--form"}


@command("merge")
def merge(
    method: Optional[str] = typer.Option(None, "--method", help="wa | ta | ties | cart | r2m (default: params.yaml merge.method)."),
    pretrained: Path = typer.Option(..., "--pretrained", help="θ0: the pretrained backbone (.safetensors)."),
    specialist: List[Path] = typer.Option([], "--specialist", help="A specialist checkpoint; repeat for each."),
    out: Path = typer.Option(..., "--out", help="Merged checkpoint to write (.safetensors; sidecar <out>.json)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="R²M: α in η = α‖τ_core‖/‖τ_res‖."),
    rank: Optional[float] = typer.Option(None, "--rank", help="R²M / CART: rank ratio r (k = ⌊r·min(m,n)⌋ ≥ 1)."),
    lam: Optional[float] = typer.Option(None, "--lam", help="TA / TIES: λ."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="TIES: fraction of |τ_i| kept."),
    eta: Optional[float] = typer.Option(None, "--eta", help="CART: η, the scale of the summed residuals."),
    eta_mode: Optional[str] = typer.Option(None, "--eta-mode", help="R²M: normalized (§4) | literal (eq. 6)."),
    core: Optional[str] = typer.Option(None, "--core", help="R²M: centered (eq. 2) | uncentered."),
    k: Optional[int] = typer.Option(None, "--k", help="R²M: rank of the Real core (default 1)."),
    form: Optional[str] = typer.Option(None, "--form", help="TA: sum|mean; TIES: official|sum; CART: sum|mean."),
    assume_theta0: bool = typer.Option(
        False, "--assume-theta0", help="Accept specialists without an r2m θ0 record (theta0_sha256) as fine-tuned from --pretrained; recorded as a waived check. A recorded hash is still checked."),
    hierarchy: Optional[str] = typer.Option(
        None, "--hierarchy", help="R²M only: none (flat) | family (group by each specialist's recorded forgery family) | "
        "GEN=GROUP,GEN=GROUP,...: merge each group, then R²M over the groups (docs/method.md); default: merge.hierarchy."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: cuda when present)."),
    params_file: Optional[Path] = typer.Option(None, "--params", help="params.yaml to read (default: the project's)."),
    progress: bool = typer.Option(True, "--progress/--quiet", help="Progress bars on stderr."),
) -> None:
    """Merge specialists into one detector with WA, TA, TIES, CART or R²M (docs/method.md).

    Every specialist must come from the same θ0 (checked by sha256; for files made elsewhere,
    vouch with --assume-theta0 or record it with `r2m import-checkpoint --pretrained`) and share
    its keys and shapes. Heads are averaged for every method. Writes the merged safetensors plus a JSON
    sidecar with the method, hyperparameters, inputs and diagnostics.
    """
    from r2m.config import load_params
    from r2m.errors import MergeError
    from r2m.merging.files import merge_files
    from r2m.merging.registry import get_method, plan

    configured = plan(load_params(params_file).merge)
    method = method or configured.method.name
    spec = get_method(method)
    given = {"alpha": alpha, "rank": rank, "lam": lam, "top_p": top_p, "eta": eta, "eta_mode": eta_mode, "core": core, "k": k, "form": form}
    given = {name: v for name, v in given.items() if v is not None}
    for name in given:
        if name not in spec.hparams:
            raise MergeError(f"{_FLAGS[name]} does not apply to method '{method}' (it takes: {', '.join(_FLAGS[h] for h in spec.hparams) or 'no options'})")
    if spec is configured.method:  # the configured method's parameters live in params.yaml (one source of truth)
        given = {**configured.parameters, **given}
    chosen = hierarchy if hierarchy is not None else (configured.hierarchy if spec is configured.method else "none")
    groups = None
    if chosen != "none":
        from r2m.merging.hierarchy import specialist_groups

        if "=" in str(chosen):
            pairs = [item.split("=", 1) for item in str(chosen).split(",") if item.strip()]
            if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
                raise MergeError(f"--hierarchy {chosen}: expected none, family or GEN=GROUP,GEN=GROUP,...")
            chosen = {g.strip(): grp.strip() for g, grp in pairs}
        elif chosen != "family":
            raise MergeError(f"--hierarchy {chosen}: expected none, family or GEN=GROUP,GEN=GROUP,...")
        if spec.hierarchical is None:
            raise MergeError(f"--hierarchy applies to r2m only, not to method '{method}'")
        groups = specialist_groups(chosen, specialist)
    result, meta = merge_files(method, pretrained, specialist, out, given, device=device, progress=progress,
                               assume_theta0=assume_theta0, groups=groups, level1=given if groups else None)
    d = result.diagnostics
    summary = ", ".join(f"{key} {d[key]:.4g}" for key in ("tau_bar_norm", "core_ratio", "cos_v_tau_bar", "residual_norm", "eta") if isinstance(d.get(key), float))
    hp = ", ".join(f"{key}={v}" for key, v in result.hparams.items())
    if groups:
        hp += "; groups " + "; ".join(f"{g}: {', '.join(m)}" for g, m in meta["hparams"]["hierarchy"]["groups"].items())
    typer.echo(f"{method}({hp}) of {len(specialist)} specialists -> {out} ({meta['merge_seconds']:.1f} s){'; ' + summary if summary else ''}")
