"""``lens-merge sweep``: train and evaluate a grid of recipe values on one training cache.

- ``grid``: ``--grid key=v1,v2`` -> validated points (``parse_grid``, ``expand_grid``).
- ``runner``: probe once, train + eval each point, resumable (``run_sweep``).
- ``metrics``: a row's numbers from ``lens_report.json``; the Pareto front.
- ``table`` / ``plot``: ``sweep.md`` (and the README block), ``sweep_pareto.png``.
- ``record``: the pydantic models of ``point.json`` and ``sweep.json``.
"""

from lens_merge.sweep.grid import Point, expand_grid, parse_grid
from lens_merge.sweep.record import SweepMetrics, SweepPoint, SweepRecord
from lens_merge.sweep.table import check_markers, render_table, update_readme

__all__ = ["Point", "SweepMetrics", "SweepPoint", "SweepRecord", "check_markers",
           "expand_grid", "parse_grid", "render_table", "update_readme"]
