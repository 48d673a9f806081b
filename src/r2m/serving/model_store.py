"""The served model and its hot reload (deploy/README.md, "Run it").

`ModelStore` holds one `LoadedModel` (an ONNX Runtime session + what its metadata says). A
poller checks the repository every `serve.poll_interval_s`; when the version to serve differs
from the served one, it loads the new session *beside* the old one and swaps a single
reference. The version to serve is the one config.pbtxt's `version_policy: { specific: ... }`
names (publishing points it at the new version, a rollback at the restored champion's; see
`r2m.runtime.repository`), else the newest complete version. A request reads that reference
once and keeps its `LoadedModel` to the end, so requests in flight finish on the old session,
which is freed when the last of them drops it. A version that fails to load is logged, skipped
and the current one keeps serving. Each loaded version also carries the batching its
config.pbtxt declares (`BatchPolicy`), read when it is loaded.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from r2m.runtime.metadata import parse_metadata
from r2m.runtime.preprocess import Preprocessing
from r2m.runtime.repository import (MODEL_FILE, MODEL_NAME, BatchPolicy, batch_policy, list_versions, model_dir,
                                    served_version)
from r2m.runtime.session import import_onnxruntime, open_session

ort = import_onnxruntime()  # a one-line error naming the extras when it is missing

log = logging.getLogger("r2m.serving")

OIP_DATATYPES = {"tensor(float)": "FP32", "tensor(float16)": "FP16", "tensor(int64)": "INT64",
                 "tensor(int32)": "INT32", "tensor(uint8)": "UINT8", "tensor(bool)": "BOOL"}


def _describe(args) -> list[dict]:
    return [{"name": a.name, "datatype": OIP_DATATYPES.get(a.type, a.type),
             "shape": [d if isinstance(d, int) else -1 for d in a.shape]} for a in args]


@dataclass(frozen=True)
class LoadedModel:
    """One published version, ready to score."""

    name: str
    version: int
    path: Path
    session: ort.InferenceSession = field(repr=False)
    preprocess: Preprocessing
    metadata: dict  # {"preprocessing", "lineage", "precision", "labels"}
    inputs: list[dict]  # OIP tensor metadata: name, datatype, shape (-1 = dynamic)
    outputs: list[dict]
    batching: BatchPolicy = BatchPolicy()  # from config.pbtxt when this version was loaded

    @property
    def input_name(self) -> str:
        return self.inputs[0]["name"]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.outputs]


def load_version(repository: Path | str, version: int, threads: int = 1, name: str = MODEL_NAME,
                 providers: Sequence[str] | None = None) -> LoadedModel:
    """Open `<repository>/<name>/<version>/model.onnx`, read its r2m metadata and the batching
    config.pbtxt declares."""
    path = model_dir(repository, name) / str(version) / MODEL_FILE
    session = open_session(path, threads, providers)
    metadata = parse_metadata(session.get_modelmeta().custom_metadata_map, path)
    inputs, outputs = _describe(session.get_inputs()), _describe(session.get_outputs())
    if len(inputs) != 1 or len(inputs[0]["shape"]) != 4:
        raise ValueError(f"{path}: expected one input [B, 3, H, W], got {inputs}")
    return LoadedModel(name, version, path, session, Preprocessing.from_dict(metadata["preprocessing"]),
                       metadata, inputs, outputs, batch_policy(repository, name))


class ModelStore:
    """The newest loadable version of one model in a repository, swapped atomically on change."""

    def __init__(self, repository: Path | str, threads: int = 1, name: str = MODEL_NAME,
                 providers: Sequence[str] | None = None):
        self.repository, self.threads, self.name, self.providers = Path(repository), threads, name, providers
        self._current: LoadedModel | None = None
        self._load_lock = threading.Lock()  # serialises loads; readers never take it
        self._failed: dict[int, str] = {}
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    @property
    def current(self) -> LoadedModel | None:
        """The model to use for one whole request (read once, keep the reference)."""
        return self._current

    @property
    def failed(self) -> dict[int, str]:
        return dict(self._failed)

    def wanted(self) -> list[int]:
        """Versions to try, best first: the one config.pbtxt names (when it is published), else
        the newest; without anything served yet, every other version after it, newest first."""
        versions = list_versions(self.repository, self.name)
        named = served_version(self.repository, self.name)
        if named in versions:
            rest = [v for v in reversed(versions) if v != named]
            return [named, *(rest if self._current is None else [])]
        return list(reversed(versions))

    def refresh(self) -> LoadedModel | None:
        """Serve the version config.pbtxt names (else the newest) if it loads; no-op when it is
        already served; a version that fails to load is skipped and the current one kept."""
        with self._load_lock:
            current = self._current
            for version in self.wanted():
                if current is not None and version == current.version:
                    return current
                if version in self._failed:
                    continue
                try:
                    model = load_version(self.repository, version, self.threads, self.name, self.providers)
                except Exception as err:  # a broken publish must not take the server down
                    self._failed[version] = f"{type(err).__name__}: {err}"
                    log.error("model %s version %d failed to load, keeping %s: %s", self.name, version,
                              current.version if current else "none", self._failed[version])
                    continue
                self._current = model  # one reference assignment: atomic for readers
                log.warning("serving %s version %d (%s)", self.name, version, model.metadata["precision"])
                return model
            return current

    def start_polling(self, interval_s: float) -> None:
        """Refresh every `interval_s` seconds in a daemon thread until `stop_polling()`."""
        if self._poller is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.refresh()
                except Exception:  # e.g. the repository briefly unreadable: try again next tick
                    log.exception("polling %s failed", self.repository)

        self._poller = threading.Thread(target=loop, name="r2m-model-poller", daemon=True)
        self._poller.start()

    def stop_polling(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5)
            self._poller = None
