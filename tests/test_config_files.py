"""Config files that say something wrong are refused in one line."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import yaml
from fixtures import make_generator_dataset
from PIL import Image

from r2m.config import DataConfig, load_params
from r2m.data import decode_image, validate_dataset
from r2m.errors import ConfigError, DatasetError


def r2m(*args, cwd, env=None):
    import os

    return subprocess.run([sys.executable, "-m", "r2m.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})})


def test_params_flag_naming_a_missing_file_fails_in_one_line(project):
    missing = project / "typo-params.yaml"
    proc = r2m("validate", "--params", str(missing), cwd=project)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == f"r2m validate: error: {missing}: no such params file (named by --params)"


def test_r2m_params_naming_a_missing_file_fails(project, monkeypatch):
    missing = project / "nowhere.yaml"
    monkeypatch.setenv("R2M_PARAMS", str(missing))
    with pytest.raises(ConfigError, match="nowhere.yaml: no such params file \\(named by R2M_PARAMS\\)"):
        load_params()
    proc = r2m("validate", cwd=project, env={"R2M_PARAMS": str(missing)})
    assert proc.returncode == 2 and "named by R2M_PARAMS" in proc.stderr and "Traceback" not in proc.stderr


def test_no_params_file_at_the_project_root_still_means_defaults(project):
    assert not (project / "params.yaml").exists()
    assert load_params().data == DataConfig()


@pytest.mark.parametrize("value", [0, -5])
def test_max_image_pixels_must_be_positive(project, value):
    (project / "params.yaml").write_text(yaml.safe_dump({"data": {"max_image_pixels": value}}))
    with pytest.raises(ConfigError, match="'data.max_image_pixels'"):
        load_params()


def test_bomb_message_quotes_one_limit():
    buf = io.BytesIO()
    Image.new("L", (40, 40)).save(buf, format="PNG")  # 1600 px: between our limit and twice it
    for limit in (1000, 700):
        with pytest.raises(DatasetError) as err:
            decode_image(buf.getvalue(), "x.png", max_pixels=limit)
        assert err.value.reason == f"decompression bomb: 40x40 = 1600 pixels > data.max_image_pixels = {limit}"


def test_duplicate_key_in_generator_yaml_is_rejected(project):
    root = project / "data" / "generators"
    folder = make_generator_dataset(root, "dup-ff", n_per_class=8, groups=4)
    text = (folder / "generator.yaml").read_text()
    (folder / "generator.yaml").write_text(text + "role: unseen\n")  # role given twice: which one?
    with pytest.raises(DatasetError, match="duplicate key 'role'"):
        validate_dataset(folder, root)


def test_duplicate_key_in_params_yaml_is_rejected(project):
    (project / "params.yaml").write_text("train:\n  epochs: 3\n  epochs: 30\n")
    with pytest.raises(ConfigError, match="duplicate key 'epochs'"):
        load_params()
