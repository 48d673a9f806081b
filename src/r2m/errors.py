"""Errors users can catch. Every message names the file, key or threshold at fault."""

from __future__ import annotations

from pathlib import Path


class R2MError(Exception):
    """Base class: the CLI prints these as one line on stderr and exits with status 2 (any other
    exception is a bug in r2m: one line naming it and its crash log, exit status 70)."""


class ConfigError(R2MError):
    """params.yaml (or an environment override) is invalid."""


class DatasetError(R2MError):
    """A generator dataset violates the data contract; it is quarantined, never half ingested."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class CheckpointError(R2MError):
    """A checkpoint file is missing, unreadable, or breaks the checkpoint contract."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class MergeError(R2MError):
    """Specialists cannot be merged (different θ0, keys, shapes, non-finite weights...)."""


class TrainingError(R2MError):
    """A specialist could not be trained or failed its own checks."""


class EvaluationError(R2MError):
    """Scores cannot be computed (e.g. a test split with one class only)."""


class GateFailed(R2MError):
    """A candidate failed the DROP/GAIN/regression gate; `report` holds every number."""

    def __init__(self, report, message: str):
        self.report = report
        super().__init__(message)


class ExportError(R2MError):
    """ONNX export or its parity check failed."""


class RegistryError(R2MError):
    """The MLflow registry is not in the state an operation needs."""


class DependencyError(R2MError):
    """An optional dependency (a pip extra such as ONNX Runtime) is not installed."""


def check_output_file(path: Path | str, error: type[R2MError] = R2MError, flag: str = "--out") -> Path:
    """`path` if a file can be written there: it is not a folder and no folder above it is a file.

    Raises `error` naming `flag` and the path otherwise (before any work is done, so a long
    merge or export never ends in an OSError traceback). `error` is any R2MError class; those
    built from (path, reason), `CheckpointError` and `DatasetError`, get the path as theirs.
    """
    path = Path(path)
    reason = None
    if path.is_dir():
        reason = "is a folder, not a file name"
    else:
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    reason = f"{parent} is a file, not a folder"
                break
    if reason is not None:
        if issubclass(error, (CheckpointError, DatasetError)):
            raise error(path, f"{flag} {reason}")
        raise error(f"{flag} {path}: {reason}")
    return path
