"""Import of a DeepfakeBench / DF40 dataset JSON into a generator dataset, frames used in place.

DeepfakeBench describes a dataset as
`{dataset: {label: {train|val|test: {video: {"label": str, "frames": [path, ...]}}}}}`
(FaceForensics++ JSONs add a compression level, `{split: {"c23": {video: ...}}}`), with label
strings mapped to 0/1 by the `label_dict` of its training config. The import writes only a
`generator.yaml` whose `samples_root` is the frames folder and whose `samples` list every frame
with its label, its video (the group) and the JSON's split: no image is copied.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

from pydantic import ValidationError

from r2m.data.manifest import MANIFEST_NAME, GeneratorManifest, SampleEntry, describe_error, dump_manifest
from r2m.data.splits import SPLITS
from r2m.errors import DatasetError

# DeepfakeBench's usual `label_dict` (training/config/*.yaml): 0 = real, 1 = fake.
DEEPFAKEBENCH_LABEL_DICT: dict[str, int] = {
    "FF-real": 0, "FF-DF": 1, "FF-F2F": 1, "FF-FS": 1, "FF-NT": 1, "FF-FH": 1, "FF-SH": 1,
    "DFD_real": 0, "DFD_fake": 1,
    "CelebDFv1_real": 0, "CelebDFv1_fake": 1, "CelebDFv2_real": 0, "CelebDFv2_fake": 1,
    "DFDCP_Real": 0, "DFDCP_FakeA": 1, "DFDCP_FakeB": 1,
    "DFDC_Real": 0, "DFDC_Fake": 1,
    "DF_real": 0, "DF_fake": 1,
    "UADFV_Real": 0, "UADFV_Fake": 1,
}


def label_of(name: str, label_dict: Mapping[str, int]) -> int | None:
    """0/1 for a label string: `label_dict` first, else a name ending in real/fake (DF40's
    `<method>_Real` / `<method>_Fake` style), else None."""
    if name in label_dict:
        return int(label_dict[name])
    lowered = name.lower()
    if lowered.endswith("real"):
        return 0
    if lowered.endswith("fake"):
        return 1
    return None


def _videos(node: object, compression: str, where: str, source: Path) -> Mapping[str, Mapping]:
    """The `{video: {label, frames}}` mapping of one split, descending a compression level."""
    if not isinstance(node, dict):
        raise DatasetError(source, f"{where}: expected a mapping of videos")
    if all(isinstance(v, dict) and "frames" in v for v in node.values()):
        return node
    if isinstance(node.get(compression), dict):
        return _videos(node[compression], compression, f"{where}/{compression}", source)
    raise DatasetError(
        source, f"{where}: neither videos with 'frames' nor compression level '{compression}' (keys: {sorted(node)[:5]})"
    )


def _relative_frame(frame: str, frames_root: Path, source: Path) -> str:
    """A frame path relative to `frames_root`; absolute paths must lie inside it."""
    path = PurePosixPath(frame.replace("\\", "/"))
    if path.is_absolute():
        try:
            path = path.relative_to(PurePosixPath(frames_root.as_posix()))
        except ValueError:
            raise DatasetError(source, f"frame '{frame}' lies outside --frames-root {frames_root}") from None
    if ".." in path.parts or not path.parts:
        raise DatasetError(source, f"frame '{frame}' escapes --frames-root {frames_root}")
    return path.as_posix()


def read_deepfakebench_json(
    json_path: Path | str,
    dataset: str,
    frames_root: Path | str,
    *,
    labels: Iterable[str] | None = None,
    label_dict: Mapping[str, int] | None = None,
    compression: str = "c23",
) -> list[SampleEntry]:
    """The samples of `dataset` in a DeepfakeBench JSON (restricted to `labels` when given)."""
    source = Path(json_path)
    frames_root = Path(frames_root).resolve()
    label_dict = DEEPFAKEBENCH_LABEL_DICT if label_dict is None else label_dict
    try:
        tree = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(source, f"cannot read: {err}") from None
    except json.JSONDecodeError as err:
        raise DatasetError(source, f"not valid JSON: {err}") from None
    if not isinstance(tree, dict) or dataset not in tree:
        available = sorted(tree)[:10] if isinstance(tree, dict) else []
        raise DatasetError(source, f"no dataset '{dataset}' in the JSON (datasets: {available})")
    by_label = tree[dataset]
    if not isinstance(by_label, dict):
        raise DatasetError(source, f"{dataset}: expected a mapping of labels")
    wanted = set(labels) if labels else set(by_label)
    if missing := wanted - set(by_label):
        raise DatasetError(source, f"{dataset}: no label(s) {sorted(missing)} (labels: {sorted(by_label)})")
    samples: list[SampleEntry] = []
    video_split: dict[str, str] = {}
    for label_key in sorted(wanted):
        splits = by_label[label_key]
        if not isinstance(splits, dict):
            raise DatasetError(source, f"{dataset}/{label_key}: expected a mapping of splits")
        for split, node in splits.items():
            where = f"{dataset}/{label_key}/{split}"
            if split not in SPLITS:
                raise DatasetError(source, f"{where}: unknown split (expected {', '.join(SPLITS)})")
            for video, info in _videos(node, compression, where, source).items():
                label_name = str(info.get("label", label_key))
                label = label_of(label_name, label_dict)
                if label is None:
                    raise DatasetError(source, f"{where}/{video}: label '{label_name}' is not in label_dict (pass --label-dict)")
                if video_split.setdefault(video, split) != split:
                    raise DatasetError(source, f"video '{video}' is in splits '{video_split[video]}' and '{split}' (a leak)")
                frames = info.get("frames")
                if not isinstance(frames, list) or not all(isinstance(f, str) for f in frames):
                    raise DatasetError(source, f"{where}/{video}: 'frames' must be a list of paths")
                for frame in frames:
                    rel = _relative_frame(frame, frames_root, source)
                    samples.append(SampleEntry(path=rel, label=label, group=str(video), split=split))
    return samples


def import_deepfakebench(
    json_path: Path | str,
    dataset: str,
    frames_root: Path | str,
    out_dir: Path | str,
    *,
    family: str = "other",
    domain: str | None = None,
    role: str = "seen",
    labels: Iterable[str] | None = None,
    label_dict: Mapping[str, int] | None = None,
    compression: str = "c23",
    notes: str | None = None,
) -> Path:
    """Write `<out_dir>/generator.yaml` for a DeepfakeBench/DF40 dataset; return its path.

    The manifest's name is the folder name of `out_dir`; frames stay under `frames_root`
    (`samples_root`) and splits come from the JSON. Missing frames, unknown labels, a video in two
    splits or a one-class selection are refused before anything is written.
    """
    source, out_dir = Path(json_path), Path(out_dir)
    frames_root = Path(frames_root).resolve()
    if not frames_root.is_dir():
        raise DatasetError(frames_root, "--frames-root is not a folder")
    if (out_dir / MANIFEST_NAME).exists() or (out_dir / MANIFEST_NAME).is_symlink():
        raise DatasetError(out_dir / MANIFEST_NAME, "already exists: remove it or choose another --out")
    samples = read_deepfakebench_json(
        source, dataset, frames_root, labels=labels, label_dict=label_dict, compression=compression
    )
    if {s.label for s in samples} != {0, 1}:
        raise DatasetError(source, f"{dataset}: the selected labels hold one class only (need real and fake)")
    for s in samples:
        if not os.path.isfile(frames_root / s.path):
            raise DatasetError(frames_root / s.path, f"listed in {source.name} but missing")
    samples.sort(key=lambda s: s.path)
    chosen = sorted(labels) if labels else "all"
    try:
        manifest = GeneratorManifest(
            name=out_dir.name,
            family=family,
            domain=domain or re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-") or "unknown",
            role=role,
            samples_root=str(frames_root),
            samples=samples,
            notes=notes if notes is not None else (
                f"imported from DeepfakeBench JSON {source.name}: dataset {dataset}, labels {chosen}, "
                f"compression {compression}"
            ),
        )
    except ValidationError as err:
        raise DatasetError(out_dir / MANIFEST_NAME, f"cannot write manifest: {describe_error(err)}") from None
    return dump_manifest(manifest, out_dir)
