"""Proxy pretraining of the tiny θ0 (r2m.models.pretrain) and its hook in ensure_pretrained."""

from __future__ import annotations

import pytest
import torch

from r2m.checkpoint import BACKBONE_PREFIX, load_checkpoint, read_meta
from r2m.config import ModelConfig, Params, PretrainConfig
from r2m.errors import CheckpointError
from r2m.models import build_detector, ensure_pretrained
from r2m.models.pretrain import mask_patches, patchify, proxy_crops, run_pretraining

# Tiny: 4 epochs × 4 steps of 16 crops; a high lr so that 16 steps visibly lower the loss.
TINY = PretrainConfig(enabled=True, n_images=64, epochs=4, batch_size=16, lr=3e-3, warmup=0.1, seed=3)


def with_pretrain(params: Params, cfg: PretrainConfig) -> Params:
    return params.model_copy(update={"pretrain": cfg})


def seeded_init(params: Params) -> dict[str, torch.Tensor]:
    torch.manual_seed(params.model.init_seed)
    tensors = build_detector(params.model).checkpoint_tensors()
    return {k: v for k, v in tensors.items() if k.startswith(BACKBONE_PREFIX)}


def test_proxy_crops_are_real_photos_deterministic_and_in_range():
    a, src_a = proxy_crops(24, 64, seed=0, epoch=1)
    b, src_b = proxy_crops(24, 64, seed=0, epoch=1)
    c, _ = proxy_crops(24, 64, seed=0, epoch=2)
    assert a.shape == (24, 3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(src_a, src_b)
    assert not torch.equal(a, c)  # every epoch draws fresh crops
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert len(set(src_a.tolist())) == 24  # round-robin over the source regions
    d, src_d = proxy_crops(24 * 12, 64, seed=0, epoch=1, workers=2)  # chunks drawn in parallel
    e, src_e = proxy_crops(24 * 12, 64, seed=0, epoch=1, workers=1)
    assert torch.equal(d, e) and torch.equal(src_d, src_e)


def test_masking_hides_the_chosen_patches_only():
    images = torch.rand(2, 3, 16, 16)
    masked, mask = mask_patches(images, 8, 0.5, torch.Generator().manual_seed(0))
    assert mask.shape == (2, 4) and mask.sum(dim=1).tolist() == [2, 2]
    before, after = patchify(images, 8), patchify(masked, 8)
    assert torch.equal(before[~mask], after[~mask])
    assert not torch.equal(before[mask], after[mask])


def test_pretraining_is_deterministic_learns_and_is_theta0(params):
    p = with_pretrain(params, TINY)
    first = run_pretraining(p, progress=False)
    losses = [row["loss"] for row in first.history]
    assert len(losses) == TINY.epochs
    assert losses[-1] < losses[0], f"proxy loss did not go down: {losses}"
    assert {"rotation", "masked"} <= set(first.history[0])

    init = seeded_init(p)
    assert set(first.tensors) == set(init)
    moved = [k for k in init if not torch.equal(first.tensors[k], init[k])]
    assert len(moved) > len(init) // 2, "pretraining left most tensors at their random init"

    path = ensure_pretrained(p, progress=False)  # pretrains again with the same seed
    written = load_checkpoint(path).tensors
    assert all(torch.equal(written[k], first.tensors[k]) for k in first.tensors), "same seed, other θ0"
    meta = read_meta(path)
    assert meta["model"]["pretrain"]["seed"] == TINY.seed
    assert [row["loss"] for row in meta["pretraining"]["history"]] == losses

    assert ensure_pretrained(p, progress=False) == path  # unchanged config: the file is reused
    changed = with_pretrain(params, TINY.model_copy(update={"epochs": TINY.epochs + 1}))
    with pytest.raises(CheckpointError, match="pretrain"):
        ensure_pretrained(changed, progress=False)


def test_forensic_pretraining_trains_the_operation_and_edit_heads(params):
    cfg = TINY.model_copy(update={"tasks": ("manipulation",), "epochs": 2})
    p = with_pretrain(params, cfg)
    result = run_pretraining(p, progress=False)
    assert {"operation", "edited"} <= set(result.history[0]) and "rotation" not in result.history[0]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history)
    init = seeded_init(p)
    moved = [k for k in init if not torch.equal(result.tensors[k], init[k])]
    assert len(moved) > len(init) // 2
    again = run_pretraining(p, progress=False)
    assert all(torch.equal(again.tensors[k], result.tensors[k]) for k in init), "same seed, other θ0"


def test_disabled_pretraining_keeps_the_seeded_init_and_enabling_it_is_detected(params):
    assert params.pretrain.enabled is False  # the test default: fast random θ0
    path = ensure_pretrained(params)
    written = load_checkpoint(path).tensors
    init = seeded_init(params)
    assert all(torch.equal(written[k], init[k]) for k in init)
    assert "pretrain" not in read_meta(path)["model"]
    with pytest.raises(CheckpointError, match="pretrain"):
        ensure_pretrained(with_pretrain(params, TINY), progress=False)


def test_real_weights_are_not_proxy_pretrained(params, tmp_path):
    weights = ensure_pretrained(params)  # stands in for a real weights file
    other = params.model_copy(
        update={
            "model": ModelConfig(name="r2m-tiny", pretrained=str(weights)),
            "paths": params.paths.model_copy(update={"artifacts": tmp_path / "other-artifacts"}),
            "pretrain": TINY,
        }
    )
    path = ensure_pretrained(other, progress=False)
    assert path != weights
    assert "pretrain" not in read_meta(path)["model"] and "pretraining" not in read_meta(path)
    given = load_checkpoint(weights).tensors
    assert all(torch.equal(load_checkpoint(path).tensors[k], v) for k, v in given.items())
