"""The classic editing operations of the forensic proxy task (r2m.models.manipulations)."""

from __future__ import annotations

import pytest
import torch

from r2m.models.manipulations import OPERATIONS, apply_operation, manipulate, region_masks
from r2m.models.pretrain import proxy_crops


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return proxy_crops(16, 64, seed=0, epoch=1)[0]


@pytest.mark.parametrize("name", OPERATIONS[1:])
def test_every_operation_changes_a_photo_and_keeps_its_shape(photos, name):
    edited = apply_operation(name, photos, torch.Generator().manual_seed(0))
    assert edited.shape == photos.shape
    change = (edited - photos).abs().mean(dim=(1, 2, 3))
    assert bool((change > 1 / 255 / 4).all()), f"{name} left some photo unchanged: {change}"
    assert float(change.max()) < 0.2, f"{name} is not a subtle edit: {change}"


def test_blur_and_resampling_remove_fine_detail_and_sharpening_adds_it(photos):
    gen = torch.Generator().manual_seed(1)

    def detail(x):  # energy of the horizontal first difference
        return float((x[..., 1:] - x[..., :-1]).pow(2).mean())

    assert detail(apply_operation("blur", photos, gen)) < 0.8 * detail(photos)
    assert detail(apply_operation("resample", photos, gen)) < 0.9 * detail(photos)
    assert detail(apply_operation("sharpen", photos, gen)) > 1.2 * detail(photos)


def test_jpeg_is_constant_inside_quantised_blocks_grid(photos):
    edited = apply_operation("jpeg", photos, torch.Generator().manual_seed(2))
    # re-quantising a JPEG-quantised image at the same table is (almost) a no-op; the original is not
    assert (edited - photos).abs().mean() > 0.002
    assert edited.shape == photos.shape


def test_manipulate_labels_regions_and_8_bit_output(photos):
    gen = torch.Generator().manual_seed(3)
    out, labels, weight = manipulate(photos.repeat(4, 1, 1, 1), gen, local_p=0.5)
    x = photos.repeat(4, 1, 1, 1)
    assert out.shape == x.shape and labels.shape == (64,) and weight.shape == (64, 1, 64, 64)
    assert set(labels.tolist()) <= set(range(len(OPERATIONS))) and len(set(labels.tolist())) > 4
    assert torch.equal(torch.round(out * 255) / 255, out)  # quantised like the benchmark's PNGs
    untouched = labels == 0
    assert bool((weight[untouched] == 0).all())
    assert float((out[untouched] - x[untouched]).abs().max()) <= 0.5 / 255 + 1e-6
    local = (weight.flatten(1).amin(1) < 1) & ~untouched
    assert bool(local.any()) and bool(((weight.flatten(1).amax(1) == 1) & ~untouched & ~local).any())
    # outside a local region nothing changes beyond quantisation
    outside = (weight == 0).expand_as(x) & local.view(-1, 1, 1, 1)
    assert float((out - x).abs()[outside].max()) <= 0.5 / 255 + 1e-6


def test_manipulate_is_seeded():
    x = torch.rand(8, 3, 64, 64)
    a = manipulate(x, torch.Generator().manual_seed(5))
    b = manipulate(x, torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_region_masks_cover_part_of_the_image():
    m = region_masks(32, 64, 64, torch.Generator().manual_seed(0), "cpu")
    cover = m.mean(dim=(1, 2, 3))
    assert float(cover.min()) > 0.02 and float(cover.max()) < 0.8
