"""Tables people read: one small `Table` type rendered as markdown, CSV or JSON.

A cell may carry its 95 % interval (`intervals[r][c] = (low, high)`): markdown shows
`0.912 [0.884, 0.937]`, CSV adds `<column> low` / `<column> high` columns, JSON an `intervals`
matrix.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from r2m.fileio import atomic_write_text

Number = float | int | str | None
Bounds = tuple[float, float] | None


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
    intervals: Sequence[Sequence[Bounds]] | None = None

    def cell(self, row: str, column: str) -> Number:
        return self.values[list(self.rows).index(row)][list(self.columns).index(column)]

    def interval(self, row: str, column: str) -> Bounds:
        if self.intervals is None:
            return None
        return self.intervals[list(self.rows).index(row)][list(self.columns).index(column)]

    def _shown(self, r: int, c: int) -> str:
        text = _cell(self.values[r][c], self.digits)
        bounds = self.intervals[r][c] if self.intervals is not None else None
        if bounds is not None and text != "–":
            text += f" [{bounds[0]:.{self.digits}f}, {bounds[1]:.{self.digits}f}]"
        return text

    def to_markdown(self) -> str:
        head = [self.row_header, *self.columns]
        lines = [
            f"**{self.title}**",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join([":---"] + ["---:"] * len(self.columns)) + "|",
        ]
        for r, row in enumerate(self.rows):
            lines.append("| " + " | ".join([row, *(self._shown(r, c) for c in range(len(self.columns)))]) + " |")
        if self.notes:
            lines += ["", self.notes]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        if self.intervals is None:
            writer.writerow([self.row_header, *self.columns])
            for row, vals in zip(self.rows, self.values):
                writer.writerow([row, *("" if v is None else v for v in vals)])
            return buf.getvalue()
        writer.writerow([self.row_header, *(f"{c}{part}" for c in self.columns for part in ("", " low", " high"))])
        for row, vals, bounds in zip(self.rows, self.values, self.intervals):
            cells = []
            for v, b in zip(vals, bounds):
                cells += ["" if v is None else v, *(("", "") if b is None else b)]
            writer.writerow([row, *cells])
        return buf.getvalue()

    def to_dict(self) -> dict:
        return {
            "title": self.title,
            "row_header": self.row_header,
            "rows": list(self.rows),
            "columns": list(self.columns),
            "values": [list(v) for v in self.values],
            "intervals": None if self.intervals is None else [[None if b is None else list(b) for b in row]
                                                              for row in self.intervals],
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
            atomic_write_text(path, text, fsync=False)
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
    atomic_write_text(combined, "\n".join(t.to_markdown() for t in tables), fsync=False)
    return [*paths, combined]
