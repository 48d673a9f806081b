"""The data contract: manifests, discovery, validation, splits, DeepfakeBench import, image
decoding, transforms (DF40 recipe) and the torch dataset. See docs/architecture.md, "Data contract".

Importing this package never imports torch: the torch-based names (`ImageDataset`,
`build_transform`) load on first use (PEP 562 `__getattr__`), so discovery and validation (the
watcher, `r2m validate`) and the ONNX server (`decode_image`, `to_pixel_array` from
`r2m.data.pixels`) start without it.
"""

from importlib import import_module

from r2m.data.deepfakebench import DEEPFAKEBENCH_LABEL_DICT, import_deepfakebench, read_deepfakebench_json
from r2m.data.generator import FAKE, REAL, GeneratorDataset, Sample, balanced_sample
from r2m.data.images import decode_image, load_image
from r2m.data.manifest import MANIFEST_NAME, GeneratorManifest, SampleEntry, discover_datasets, load_manifest
from r2m.data.pixels import to_pixel_array
from r2m.data.splits import SPLITS, assign_splits, group_of
from r2m.data.validate import quarantine, validate_data_root, validate_dataset

__all__ = [
    "DEEPFAKEBENCH_LABEL_DICT",
    "FAKE",
    "MANIFEST_NAME",
    "REAL",
    "SPLITS",
    "GeneratorDataset",
    "GeneratorManifest",
    "ImageDataset",
    "Sample",
    "SampleEntry",
    "assign_splits",
    "balanced_sample",
    "build_transform",
    "decode_image",
    "discover_datasets",
    "group_of",
    "import_deepfakebench",
    "load_image",
    "load_manifest",
    "quarantine",
    "read_deepfakebench_json",
    "to_pixel_array",
    "validate_data_root",
    "validate_dataset",
]

_LAZY = {"ImageDataset": "r2m.data.dataset", "build_transform": "r2m.data.transforms"}  # these import torch


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'r2m.data' has no attribute '{name}'")
