"""The embedded benchmark (`r2m demo-data`, docs/benchmark.md): deterministic, valid under the data
contract, leak-free, and every family's artifact measurably present."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from r2m.cli import app
from r2m.data import FAKE, load_image, validate_dataset
from r2m.data.demo import DATASETS, DOMAINS, FAMILIES, DatasetSpec, build_dataset, domain_sources
from r2m.data.demo import measures
from r2m.data.demo.families import match_moments
from r2m.data.demo.sources import PHOTO_FACES, photo, sample_crop


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """The whole benchmark at a tiny size, built once through the CLI."""
    root = tmp_path_factory.mktemp("generators")
    result = CliRunner().invoke(app, ["demo-data", "--out", str(root), "--size", "8", "--unseen-size", "8", "--workers", "1"])
    assert result.exit_code == 0, result.output
    return root


def test_cli_writes_every_family_over_both_domains(demo_root):
    names = sorted(p.name for p in demo_root.iterdir())
    assert names == sorted(spec.name for spec in DATASETS)
    roles = {validate_dataset(demo_root / n, demo_root).role for n in names}
    assert roles == {"seen", "unseen"}
    seen_families = {FAMILIES[s.family].code for s in DATASETS if FAMILIES[s.family].role == "seen"}
    assert seen_families == {"FS", "FR", "EFS"}
    assert {s.domain for s in DATASETS} == set(DOMAINS) == {"faces", "scenes"}


def test_manifests_are_valid_under_the_data_contract(demo_root):
    for spec in DATASETS:
        ds = validate_dataset(demo_root / spec.name, demo_root)
        family = FAMILIES[spec.family]
        assert (ds.name, ds.family, ds.domain, ds.role) == (spec.name, family.code, spec.domain, family.role)
        counts = ds.counts()
        assert sum(c["real"] for c in counts.values()) == 8
        assert sum(c["fake"] for c in counts.values()) == 8
        if family.role == "seen":  # train, val and test, each with both classes
            assert all(c["real"] > 0 and c["fake"] > 0 for c in counts.values()), counts
        else:  # evaluation-only (Protocol 3): everything is test
            assert counts["test"] == {"real": 8, "fake": 8}, counts
        sizes = {load_image(s.path).size for s in ds.samples}
        assert sizes == {(64, 64)}


def test_no_source_straddles_two_splits(demo_root):
    for spec in DATASETS:
        ds = validate_dataset(demo_root / spec.name, demo_root)
        split_of: dict[str, str] = {}
        for s in ds.samples:
            assert split_of.setdefault(s.group, s.split) == s.split, f"{spec.name}: group {s.group} straddles"
        # every file is <source id>__<n>.png: the group is a source region, never a single crop
        assert {s.group for s in ds.samples} <= {src.id for src in domain_sources(spec.domain)}


def test_source_regions_share_no_pixels():
    for domain in DOMAINS:
        by_photo: dict[str, list] = {}
        for src in domain_sources(domain):
            by_photo.setdefault(src.photo, []).append(src.box)
        for boxes in by_photo.values():
            masks = []
            for top, left, h, w in boxes:
                masks.append((top, top + h, left, left + w))
            for i, a in enumerate(masks):
                for b in masks[i + 1 :]:
                    assert a[1] <= b[0] or b[1] <= a[0] or a[3] <= b[2] or b[3] <= a[2], (a, b)
    # faces cut from general photographs are not part of any scene region either
    for name, (top, left, h, w) in PHOTO_FACES.items():
        for src in domain_sources("scenes"):
            if src.photo == name:
                t, l, hh, ww = src.box
                assert t + hh <= top or top + h <= t or l + ww <= left or left + w <= l


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    spec = DatasetSpec("fs", "scenes")
    a = build_dataset(spec, tmp_path / "a", size=6, seed=3, image_size=64)
    b = build_dataset(spec, tmp_path / "b", size=6, seed=3, image_size=64)
    c = build_dataset(spec, tmp_path / "c", size=6, seed=4, image_size=64)
    assert _digests(a) == _digests(b)
    assert _digests(a) != _digests(c)


def test_rebuild_replaces_its_own_output_but_refuses_foreign_folders(tmp_path):
    spec = DatasetSpec("efs", "faces")
    build_dataset(spec, tmp_path, size=4, seed=0, image_size=32)
    rebuilt = build_dataset(spec, tmp_path, size=5, seed=0, image_size=32)
    assert len(list((rebuilt / "real").iterdir())) == 5
    foreign = tmp_path / "fr-faces"
    (foreign / "real").mkdir(parents=True)
    result = CliRunner().invoke(app, ["demo-data", "--out", str(tmp_path), "--size", "2", "--workers", "1"])
    assert result.exit_code == 2
    assert "fr-faces" in result.output and "not built by r2m demo-data" in result.output
    assert (foreign / "real").is_dir()


def test_bad_size_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["demo-data", "--out", str(tmp_path), "--size", "0"])
    assert result.exit_code == 2
    assert "--size" in result.output and "Traceback" not in result.output


def test_bundled_photographs_load_offline():
    assert len(domain_sources("faces")) >= 100
    assert len(domain_sources("scenes")) >= 100
    for src in domain_sources("scenes") + domain_sources("faces")[-2:]:
        img = photo(src.photo)
        assert img.dtype == np.uint8 and img.shape[2] in (1, 3)
        top, left, h, w = src.box
        assert top + h <= img.shape[0] and left + w <= img.shape[1]


def test_fakes_keep_the_mean_and_std_of_their_crop():
    rng = np.random.default_rng(0)
    src = domain_sources("scenes")[5]
    for family in FAMILIES.values():
        crop = sample_crop(src, rng, 64)
        fake, _ = family.make_fake(crop, rng)
        np.testing.assert_allclose(fake.mean((0, 1)), crop.mean((0, 1)), atol=2e-3)
        np.testing.assert_allclose(fake.std((0, 1)), crop.std((0, 1)), atol=4e-3)
    grey = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64, 1)
    out = match_moments(grey * 0.5 + 0.2, grey)
    np.testing.assert_allclose(out, grey, atol=1e-5)


# ----------------------------------------------------------------- each family's artifact


def _pairs(family: str, n: int = 40, domain: str = "scenes") -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(real crop, source crop, fake made from the source crop) triples of one family."""
    rng = np.random.default_rng(11)
    pool = domain_sources(domain)
    out = []
    for i in range(n):
        src = pool[(i * 7) % len(pool)]
        real = sample_crop(src, rng, 64)
        crop = sample_crop(src, rng, 64)
        out.append((real, crop, FAMILIES[family].make_fake(crop, rng)[0]))
    return out


def _auc(stat, triples) -> float:
    reals = [stat(r) for r, _, _ in triples]
    fakes = [stat(f) for _, _, f in triples]
    return roc_auc_score([0] * len(reals) + [1] * len(fakes), reals + fakes)


@pytest.mark.parametrize("domain", DOMAINS)
def test_efs_fakes_carry_spectral_peaks_at_the_upsampling_frequency(domain):
    triples = _pairs("efs", domain=domain)
    assert _auc(lambda x: measures.spectral_peak_ratio(x, 4), triples) > 0.7


def test_diffusion_like_fakes_lose_the_detail_of_their_crop():
    """Noise then denoise gives back a smoothed image: the change is minus the lost detail."""
    for domain in DOMAINS:
        loss = {f: np.median([measures.detail_loss(fake, crop) for _, crop, fake in _pairs(f, 25, domain)]) for f in FAMILIES}
        others = max(v for f, v in loss.items() if f != "diff")
        assert loss["diff"] > 0.4 and loss["diff"] > others + 0.1, (domain, loss)


def test_local_families_change_one_region_global_families_the_whole_image():
    concentration = {
        f: np.median([measures.difference_concentration(fake, crop) for _, crop, fake in _pairs(f)])
        for f in FAMILIES
    }
    for local in ("fs", "fr", "inp"):
        for whole in ("efs", "diff"):
            assert concentration[local] > concentration[whole] + 0.2, concentration


@pytest.mark.parametrize("domain", DOMAINS)
def test_fs_fakes_carry_the_swap_decoders_trace(domain):
    """The blended-in copy went through the swap decoder (×8 upsampling): spectral peaks at
    multiples of H/8, the strongest at H/4 and H/2 (that it sits in one region only is
    checked by the concentration test below)."""
    assert _auc(lambda x: measures.spectral_peak_ratio(x, 4), _pairs("fs", domain=domain)) > 0.7


def test_fr_changes_sit_on_edges_fs_changes_do_not():
    """FR moves geometry: its change sits on the source's edges (moving a flat area changes
    nothing); FS recolours and recompresses a whole region, flat parts included."""
    share = {f: np.median([measures.edge_share(fake, crop) for _, crop, fake in _pairs(f)]) for f in ("fs", "fr")}
    assert share["fr"] > 0.55 and share["fr"] > share["fs"] + 0.15, share


def test_fake_label_is_the_fake_folder(demo_root):
    ds = validate_dataset(demo_root / "inp-scenes", demo_root)
    assert all((s.label == FAKE) == (s.path.parent.name == "fake") for s in ds.samples)
