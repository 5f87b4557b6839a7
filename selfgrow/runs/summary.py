"""Summary tables and JSON-safe values shared by every driver's report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def finite(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (recursively)."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def fmt(v: Any, f: str) -> str:
    """``f.format(v)``, or ``"n/a"`` for None / non-finite values."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f.format(v)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain aligned text table: first column left-aligned, the others right-aligned, a rule
    under the header."""
    table = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = []
    for n, r in enumerate(table):
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
