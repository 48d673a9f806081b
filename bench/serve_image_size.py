"""Installed size of the server image's Python packages: the whole project's set (what
deploy/Dockerfile's `serve` image installed before: `pip install '.[cpu]'`) against the
serving-only set (deploy/requirements-serve.txt + onnxruntime). Not a test: run it by hand.

    .venv/bin/python bench/serve_image_size.py

Both sets are measured in the running interpreter's environment, as installed there (the
dependency closure of each requirement list, extras not followed, each distribution's RECORD
summed), so nothing is downloaded or installed. The project's venv holds CUDA builds of torch
and torchvision; the old image installed their CPU wheels, so the "before" figure is also given
with torch, torchvision and their CUDA packages (triton, nvidia-*) left out (a lower bound for it).
"""

from __future__ import annotations

import argparse
import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", Requirement(requirement).name).lower()


def closure(requirements: list[str]) -> set[str]:
    """Canonical names of the installed distributions `requirements` pull in (markers evaluated, no extras)."""
    seen: set[str] = set()
    todo = [_name(r) for r in requirements]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for req in dist.requires or []:
            parsed = Requirement(req)
            if parsed.marker is None or parsed.marker.evaluate({"extra": ""}):
                todo.append(_name(req))
    return seen


def installed_bytes(name: str) -> int:
    dist = metadata.distribution(name)
    total = 0
    for f in dist.files or []:
        path = Path(dist.locate_file(f))
        if path.is_file():
            total += path.stat().st_size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    before = [*project["dependencies"], *project["optional-dependencies"]["cpu"]]
    serve = [line.strip() for line in (ROOT / "deploy" / "requirements-serve.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")] + ["onnxruntime"]
    sets = {"whole project ('.[cpu]')": closure(before), "serving only (requirements-serve.txt + onnxruntime)": closure(serve)}
    sizes = {label: {n: installed_bytes(n) for n in names} for label, names in sets.items()}
    for label, per in sizes.items():
        total = sum(per.values())
        torchless = total - sum(per.get(n, 0) for n in ("torch", "torchvision", "triton") + tuple(n for n in per if n.startswith("nvidia-")))
        biggest = ", ".join(f"{n} {b / 2**20:.0f}" for n, b in sorted(per.items(), key=lambda kv: -kv[1])[:6])
        print(f"{label}: {len(per)} distributions, {total / 2**20:.0f} MiB "
              f"({torchless / 2**20:.0f} MiB without torch, torchvision, triton and nvidia-*); largest MiB: {biggest}")


if __name__ == "__main__":
    main()
