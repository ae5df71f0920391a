"""HTML pieces of the report: escaping, number format, figure and table markup, the page.

The page is one self-contained file that opens from disk: figures are base64 PNGs and the
stylesheet and the table-sorting script (``assets/report.css``, ``assets/report.js``, shipped
as package data) are inlined, so it loads no external resource.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from html import escape
from importlib.resources import files

import numpy as np

from pipeline.report import figures


@dataclass
class Section:
    """One ``<section>`` of the page: anchor id, heading and inner HTML."""

    id: str
    title: str
    body: str


@cache
def asset(name: str) -> str:
    """The text of ``assets/<name>`` (read once per process)."""
    return files("pipeline.report").joinpath("assets", name).read_text(encoding="utf-8")


def esc(x) -> str:
    """``str(x)`` escaped for HTML text and attribute values."""
    return escape(str(x))


def fmt(x, digits: int = 4) -> str:
    """Compact number formatting; '–' for NaN/None."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    if isinstance(x, (int, np.integer)) or (
        isinstance(x, float) and x.is_integer() and abs(x) < 1e12
    ):
        return f"{int(x):d}"
    return f"{float(x):.{digits}g}"


def note(text: str) -> str:
    """A muted one-line note (why a figure or table is missing)."""
    return f'<p class="note">{esc(text)}</p>'


def figure_html(fig, caption: str, missing: str) -> str:
    """``<figure>`` with the PNG and its 'how to read' caption; a note when ``fig`` is None."""
    if fig is None:
        return note(missing)
    uri = figures.figure_to_data_uri(fig)
    return (
        f'<figure><img alt="{esc(caption)}" src="{uri}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def cell_html(v) -> str:
    """One ``<td>``: numbers right-aligned with ``data-v`` (empty for NaN) for numeric sorting."""
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        num = float(v)
        return f'<td class="num" data-v="{num if np.isfinite(num) else ""}">{fmt(num)}</td>'
    return f"<td>{esc(v)}</td>"


def table_html(
    header: list[str], rows: list[list], cls: str = "", row_cls: list[str] | None = None
) -> str:
    """A table; class ``sortable`` makes the inline script sort it by clicking a header."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        rc = f' class="{row_cls[i]}"' if row_cls and row_cls[i] else ""
        body.append(f"<tr{rc}>{''.join(cell_html(v) for v in row)}</tr>")
    table = (
        f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    )
    return f'<div class="tablewrap">{table}</div>' if "sortable" in cls else table


def render_html(sections: list[Section], title: str) -> str:
    """The whole page as one string: navigation, the sections, inline CSS and JS."""
    nav = "".join(f'<a href="#{s.id}">{esc(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{s.id}"><h2>{esc(s.title)}</h2>{s.body}</section>' for s in sections
    )
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{esc(title)}</title><style>\n{asset('report.css')}</style></head><body>"
        f"<h1>{esc(title)}</h1><nav>{nav}</nav>{body}"
        f"<script>\n{asset('report.js')}</script></body></html>"
    )
