"""What a session leaves behind for people: its answers as a table or map, a listing of
sessions, and a one-page HTML report.

- :mod:`~anneal_geo.reports.answers`: :func:`answers_table` (every answer, undone ones
  marked) and :func:`export_answers` (GeoPackage, CSV or Parquet;
  ``anneal-geo session export``);
- :mod:`~anneal_geo.reports.listing`: :func:`list_sessions` (``anneal-geo session list``);
- :mod:`~anneal_geo.reports.report`: :func:`write_report` (``anneal-geo session report``),
  a static page with embedded pictures.

Everything here only reads the session.
"""

from __future__ import annotations

from anneal_geo.reports.answers import ANSWER_COLUMNS, answers_table, export_answers
from anneal_geo.reports.listing import SessionSummary, list_sessions
from anneal_geo.reports.report import build_report, write_report

__all__ = [
    "ANSWER_COLUMNS",
    "SessionSummary",
    "answers_table",
    "build_report",
    "export_answers",
    "list_sessions",
    "write_report",
]
