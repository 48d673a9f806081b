"""Names shared by the registry, the reports and the evaluation, spelled out once."""

from __future__ import annotations

SPECIALIST_PREFIX = "specialist-"


def specialist_name(generator: str) -> str:
    """`specialist-<generator>`: the registered model of a generator's specialists, and the
    specialist's row in every evaluation and report."""
    return f"{SPECIALIST_PREFIX}{generator}"


def is_specialist_name(name: str) -> bool:
    return name.startswith(SPECIALIST_PREFIX)


__all__ = ["SPECIALIST_PREFIX", "is_specialist_name", "specialist_name"]
