"""`generator.yaml`: the manifest that makes a folder under the data root a generator dataset.

A folder counts as a dataset only once its manifest is present (docs/architecture.md, "Data contract"); the manifest is
parsed strictly: unknown fields are rejected with the field named, and `name` must equal the
folder name so the registry, the checkpoints and the folder can never disagree.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from r2m.config import load_yaml
from r2m.errors import DatasetError
from r2m.fileio import atomic_write_text

MANIFEST_NAME = "generator.yaml"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
Family = Literal["FS", "FR", "EFS", "FE", "other"]  # face swap, reenactment, entire synthesis, editing
Role = Literal["seen", "unseen"]  # seen: trains a specialist; unseen: evaluation only (Protocol 3)
Split = Literal["train", "val", "test"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SampleEntry(_Strict):
    """One image of an explicit sample list, relative to `samples_root` (or the dataset folder)."""

    path: str = Field(min_length=1)
    label: Literal[0, 1]  # 1 = fake, 0 = real
    group: str | None = None  # video / source id; derived from the path when absent
    split: Split | None = None  # explicit split; derived from the group when absent


class SplitLists(_Strict):
    """Explicit split lists: group ids per split. Every group of the dataset must be listed."""

    train: list[str] = []
    val: list[str] = []
    test: list[str] = []


class GeneratorManifest(_Strict):
    """The contents of `generator.yaml` (docs/architecture.md, "Data contract")."""

    name: str = Field(pattern=NAME_PATTERN)
    family: Family
    domain: str = Field(min_length=1)
    role: Role
    real_source: str | None = None  # folder relative to the data root: a shared real pool
    splits: SplitLists | None = None
    samples_root: str | None = None  # absolute folder; samples' paths are relative to it
    samples: list[SampleEntry] | None = None
    notes: str = ""

    @field_validator("real_source")
    @classmethod
    def _relative_inside(cls, v: str | None) -> str | None:
        if v is not None and not is_plain_relative(v):
            raise ValueError("must be a relative path inside the data root (no '..', not absolute)")
        return v

    @field_validator("samples_root")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_absolute():
            raise ValueError("must be an absolute folder")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> GeneratorManifest:
        if self.samples_root is not None and self.samples is None:
            raise ValueError("samples_root is set but there is no samples list")
        if self.samples is not None and self.real_source is not None:
            raise ValueError("real_source and samples exclude each other (list the real samples instead)")
        if self.samples is not None and not self.samples:
            raise ValueError("samples is an empty list")
        return self


def is_plain_relative(path: str) -> bool:
    """True for a non-empty relative POSIX path without '..' components."""
    p = PurePosixPath(path)
    return bool(path) and not p.is_absolute() and ".." not in p.parts and "\\" not in path


def describe_error(err: ValidationError) -> str:
    """One line naming the manifest field at fault."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"unknown field '{field}'"
    if first["type"] == "missing":
        return f"missing required field '{field}'"
    if first["type"] == "string_type" and (field.startswith("splits.") or field.endswith(".group")):
        return f"'{field}': group ids must be strings (quote them in YAML, e.g. '000')"
    return f"'{field}': {first['msg']}"


def parse_manifest(text: str, source: Path) -> GeneratorManifest:
    """Parse manifest text; `source` names the file in errors."""
    try:
        raw = load_yaml(text)  # a key given twice is an error, not silently the last one
    except yaml.YAMLError as err:
        raise DatasetError(source, f"not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise DatasetError(source, "malformed manifest: expected a mapping of fields")
    try:
        return GeneratorManifest(**{str(k): v for k, v in raw.items()})
    except ValidationError as err:
        raise DatasetError(source, f"malformed manifest: {describe_error(err)}") from None


def load_manifest(dataset_dir: Path | str) -> GeneratorManifest:
    """Read and validate `<dataset_dir>/generator.yaml`; its `name` must equal the folder name."""
    path = Path(dataset_dir) / MANIFEST_NAME
    if path.is_symlink():
        raise DatasetError(path, "is a symbolic link; the manifest must be a regular file")
    if not path.is_file():
        raise DatasetError(path, "missing: a dataset is complete only once generator.yaml is present")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DatasetError(path, "malformed manifest: not UTF-8 text") from None
    manifest = parse_manifest(text, path)
    if manifest.name != Path(dataset_dir).name:
        raise DatasetError(
            path, f"malformed manifest: name '{manifest.name}' differs from the folder name '{Path(dataset_dir).name}'"
        )
    return manifest


def discover_datasets(data_root: Path | str) -> list[Path]:
    """Folders directly under the data root that hold a generator.yaml, sorted by name.

    A folder without generator.yaml is still being written (incomplete) and is skipped; a folder
    whose manifest is a broken or hostile file is returned so that validation can reject it.
    """
    root = Path(data_root)
    if not root.is_dir():
        return []
    return sorted(
        child
        for child in root.iterdir()
        if not child.name.startswith(".")
        and child.is_dir()
        and ((child / MANIFEST_NAME).exists() or (child / MANIFEST_NAME).is_symlink())
    )


def dump_manifest(manifest: GeneratorManifest, dataset_dir: Path) -> Path:
    """Write generator.yaml atomically (temp file + rename): watchers never see half a manifest."""
    dataset_dir.mkdir(parents=True, exist_ok=True)
    data = manifest.model_dump(mode="json", exclude_none=True)
    if manifest.samples is not None:
        data["samples"] = [
            {k: v for k, v in s.items() if v is not None} for s in data["samples"]
        ]
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return atomic_write_text(dataset_dir / MANIFEST_NAME,
                             yaml.dump(data, Dumper=dumper, sort_keys=False, allow_unicode=True, width=1000))
