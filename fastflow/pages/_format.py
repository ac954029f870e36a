"""Formatting the pages share: numbers, bootstrap intervals over images (read from a run's metrics and written out),
markdown tables, and the one CSS of the HTML pages (the study page and the report)."""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence

from fastflow.core.metrics import interval_keys


def number(value: Optional[float], digits: int = 3, signed: bool = False, missing: str = "") -> str:
    """`value` to `digits` decimals (with its sign when `signed`); `missing` for None or a non-finite value."""
    if value is None or not math.isfinite(value):
        return missing
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def interval(low: float, high: float, digits: int = 3) -> str:
    """`[low, high]`."""
    return f"[{number(low, digits)}, {number(high, digits)}]"


def logged_intervals(metrics: Mapping[str, float], names: Iterable[str],
                     prefix: str = "best/") -> dict[str, tuple[float, float]]:
    """metric -> (low, high) from a run's `<prefix><metric>_ci_low/high` metrics, for those of `names` it logged."""
    found = {}
    for name in names:
        low, high = (prefix + key for key in interval_keys(name))
        if low in metrics and high in metrics:
            found[name] = (float(metrics[low]), float(metrics[high]))
    return found


def markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    """A markdown table: the header, a separator, a row per `body` entry."""
    return "\n".join([markdown_row(header), "|" + "---|" * len(header), *(markdown_row(cells) for cells in body)])


# The study page (study.html) and the report (paper_gap.html): `l` left-aligns a cell; the study page's rows are
# `best`, `pruned` or `failed`; the report's diff cells are `better` or `worse` and its mean rows `mean`.
STYLE = """body{font-family:system-ui,sans-serif;margin:12px;color:#1a1a1a;font-size:14px}
table{border-collapse:collapse;font-size:12px;width:100%;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 5px;
text-align:right;vertical-align:top}th{background:#f2f2f2;font-weight:600}td.l,th.l{text-align:left}
tr.best{background:#e6f4ea}tr.best td.v{font-weight:700}tr.pruned{color:#8a6d00;background:#fff8e1}
tr.failed{color:#b00020;background:#fdecea}.ci{color:#555;font-size:11px;white-space:nowrap}
code.id{font-size:10px;word-break:break-all;color:#444}.p{white-space:nowrap;font-size:11px}
img{max-width:100%;border:1px solid #ddd;margin:4px 0}.note{color:#555;font-size:12px}h2{margin-top:24px}
.better{color:#070}.worse{color:#b00}tr.mean{font-weight:bold;background:#f6f6f6}"""
