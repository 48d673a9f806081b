"""Tables people read: one small `Table` type rendered as markdown, CSV or JSON."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

Number = float | int | str | None


def _cell(value: Number, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, str)):
        return str(value)
    return f"{value:.{digits}f}"


@dataclass(frozen=True)
class Table:
    """A labelled matrix: `values[r][c]` is the cell of row `rows[r]`, column `columns[c]`."""

    name: str  # file stem, e.g. "seen_auc"
    title: str
    row_header: str
    rows: Sequence[str]
    columns: Sequence[str]
    values: Sequence[Sequence[Number]]
    notes: str = ""
    digits: int = 3

    def cell(self, row: str, column: str) -> Number:
        return self.values[list(self.rows).index(row)][list(self.columns).index(column)]

    def to_markdown(self) -> str:
        head = [self.row_header, *self.columns]
        lines = [
            f"**{self.title}**",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join([":---"] + ["---:"] * len(self.columns)) + "|",
        ]
        for row, vals in zip(self.rows, self.values):
            lines.append("| " + " | ".join([row, *(_cell(v, self.digits) for v in vals)]) + " |")
        if self.notes:
            lines += ["", self.notes]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([self.row_header, *self.columns])
        for row, vals in zip(self.rows, self.values):
            writer.writerow([row, *("" if v is None else v for v in vals)])
        return buf.getvalue()

    def to_dict(self) -> dict:
        return {
            "title": self.title,
            "row_header": self.row_header,
            "rows": list(self.rows),
            "columns": list(self.columns),
            "values": [list(v) for v in self.values],
            "notes": self.notes,
        }

    def write(self, folder: Path) -> list[Path]:
        """`<name>.md`, `<name>.csv` and `<name>.json` in `folder`; returns the paths."""
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for suffix, text in (
            (".md", self.to_markdown()),
            (".csv", self.to_csv()),
            (".json", json.dumps(self.to_dict(), indent=2)),
        ):
            path = folder / f"{self.name}{suffix}"
            path.write_text(text)
            out.append(path)
        return out


def mean(values: Sequence[Number]) -> float | None:
    """Mean of the numbers present (None when there are none)."""
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


def write_tables(tables: Sequence[Table], folder: Path) -> list[Path]:
    """Every table in every format, plus `tables.md` holding all of them in order."""
    paths = [p for t in tables for p in t.write(folder)]
    combined = folder / "tables.md"
    combined.write_text("\n".join(t.to_markdown() for t in tables))
    return [*paths, combined]
