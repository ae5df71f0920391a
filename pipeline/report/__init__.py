"""Report stage: figures, the HTML page, DVC metrics and plot tables from the store."""

from pipeline.report.render import render_report

__all__ = ["render_report"]
