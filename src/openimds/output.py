"""How CLI commands print: a readable table (or key/value list) for people, JSON with -f json."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

FORMATS = ("table", "json", "value")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out.write(sep + "\n")
    out.write("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    out.write(" |\n" + sep + "\n")
    for row in rows:
        out.write("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        out.write(" |\n")
    out.write(sep + "\n")


def emit_one(obj: Mapping[str, Any], fmt: str, out: TextIO | None = None) -> None:
    """Print one object: a Field/Value table, JSON, or bare values one per line."""
    out = out or sys.stdout
    if fmt == "json":
        out.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    elif fmt == "value":
        for value in obj.values():
            out.write(_cell(value) + "\n")
    else:
        _table(["Field", "Value"], [[k, _cell(v)] for k, v in obj.items()], out)


def emit_list(
    items: Sequence[Mapping[str, Any]], columns: Sequence[str], fmt: str,
    out: TextIO | None = None,
) -> None:
    """Print a list: a table of the given columns, JSON of whole objects, or bare values."""
    out = out or sys.stdout
    if fmt == "json":
        out.write(json.dumps(list(items), indent=2, default=str) + "\n")
    elif fmt == "value":
        for item in items:
            out.write(" ".join(_cell(item.get(c)) for c in columns) + "\n")
    else:
        _table(list(columns), [[_cell(item.get(c)) for c in columns] for item in items], out)
