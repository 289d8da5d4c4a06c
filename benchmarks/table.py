"""The table every benchmark prints: a header, a rule, one line per row."""

from __future__ import annotations

import numbers
from collections.abc import Sequence


def _cell(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, numbers.Number) else str(value)


def print_table(rows: Sequence[dict], columns: str, **formats: str) -> None:
    """Prints `rows` (dicts) in the columns named by `columns` (space-separated keys; the title
    is the key with spaces for underscores). `formats[key]` is the format spec of a column's
    values (e.g. `fwd_ms=".1f"`); numbers are right-aligned, text left-aligned, each column as
    wide as its widest cell. Values that are not numbers (e.g. "-" for not measured) print as text."""
    keys = columns.split()
    cells = [[_cell(row[k], formats.get(k, "")) for k in keys] for row in rows]
    widths = [max([len(k)] + [len(line[i]) for line in cells]) for i, k in enumerate(keys)]
    numeric = [bool(rows) and isinstance(rows[0][k], numbers.Number) for k in keys]

    def line(values):
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    header = line([k.replace("_", " ") for k in keys])
    print(header)
    print("-" * len(header))
    for values in cells:
        print(line(values))
