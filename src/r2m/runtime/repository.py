"""The model repository, read side: Triton's layout as `r2m publish` writes it.

```
<repository>/r2m_detector/config.pbtxt         which version to serve, batching, I/O
<repository>/r2m_detector/<version>/model.onnx  versions are increasing integers
```
Which version is served is config.pbtxt's own Triton field `version_policy: { specific: {
versions: [ N ] } }`; how requests are batched is its `max_batch_size` and
`dynamic_batching { max_queue_delay_microseconds }`, which `r2m serve` honours as Triton does
(deploy/README.md, "Batching"). The write side (publishing, pointing the policy) is
`r2m.export.publish`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MODEL_NAME = "r2m_detector"
MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.pbtxt"

SPECIFIC_POLICY = re.compile(r"^version_policy\s*:\s*\{\s*specific\s*:\s*\{\s*versions\s*:\s*\[\s*(\d+)\s*\]", re.M)
_MAX_BATCH = re.compile(r"^max_batch_size\s*:\s*(\d+)\s*$", re.M)
_DYNAMIC = re.compile(r"^dynamic_batching\s*\{(.*?)^\}", re.M | re.S)
_QUEUE_DELAY = re.compile(r"^\s*max_queue_delay_microseconds\s*:\s*(\d+)\s*$", re.M)


def model_dir(repository: Path | str, name: str = MODEL_NAME) -> Path:
    return Path(repository) / name


def list_versions(repository: Path | str, name: str = MODEL_NAME) -> list[int]:
    """Complete published versions, ascending (integer folders holding model.onnx)."""
    folder = model_dir(repository, name)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir()
                  if p.name.isdigit() and p.is_dir() and (p / MODEL_FILE).is_file())


def latest_version(repository: Path | str, name: str = MODEL_NAME) -> int | None:
    versions = list_versions(repository, name)
    return versions[-1] if versions else None


def _config_text(repository: Path | str, name: str) -> str | None:
    try:
        return (model_dir(repository, name) / CONFIG_FILE).read_text()
    except OSError:
        return None


def served_version(repository: Path | str, name: str = MODEL_NAME) -> int | None:
    """The version config.pbtxt names to serve, or None (no config, or Triton's `latest` policy)."""
    text = _config_text(repository, name)
    match = SPECIFIC_POLICY.search(text) if text else None
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class BatchPolicy:
    """How concurrent requests for one served version are batched: Triton's dynamic batcher.

    `max_batch_size` rows per session call (1: every request alone, no queue), waiting at most
    `max_queue_delay_s` after the oldest queued request for more to join it."""

    max_batch_size: int = 1
    max_queue_delay_s: float = 0.0

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1


def batch_policy(repository: Path | str, name: str = MODEL_NAME) -> BatchPolicy:
    """The batching config.pbtxt declares, read as Triton reads it: requests are combined only
    when `max_batch_size` > 0 and a `dynamic_batching` block is present (its queue delay
    defaults to 0: dispatch what is queued at once); no config: every request alone."""
    text = _config_text(repository, name)
    if not text:
        return BatchPolicy()
    size, dynamic = _MAX_BATCH.search(text), _DYNAMIC.search(text)
    if size is None or int(size.group(1)) <= 1 or dynamic is None:
        return BatchPolicy()
    delay = _QUEUE_DELAY.search(dynamic.group(1))
    return BatchPolicy(int(size.group(1)), int(delay.group(1)) / 1e6 if delay else 0.0)


__all__ = ["CONFIG_FILE", "MODEL_FILE", "MODEL_NAME", "SPECIFIC_POLICY", "BatchPolicy", "batch_policy",
           "latest_version", "list_versions", "model_dir", "served_version"]
