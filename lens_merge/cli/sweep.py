"""CLI command: ``sweep RECIPE --grid key=v1,v2 ...`` (train + eval a grid on one cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lens_merge.cli._common import console, progress


def sweep_cmd(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (the values the grid does not set)")],
    grid: Annotated[list[str], typer.Option(
        "--grid", "-g", help="KEY=V1,V2: a dotted recipe key (train.*, eval.*, data.*) and its "
        "values (repeatable; the sweep runs every combination)")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="sweep folder (default: OUTPUT_DIR/NAME-sweep); reruns resume")]
    = None,
    readme: Annotated[Path | None, typer.Option(
        "--readme", help="replace the text between <!-- sweep:begin --> and "
        "<!-- sweep:end --> in this file with the table")] = None,
    points: Annotated[int | None, typer.Option(
        "--points", min=1, help="run only the first N grid points (the rest on a later run)")]
    = None,
    keep_deltas: Annotated[bool, typer.Option(
        "--keep-deltas", help="also save each point's delta (points/<key>/delta)")] = False,
) -> None:
    """Train and evaluate every grid point on one training cache; table, JSON, Pareto plot."""
    from rich.markup import escape

    from lens_merge.cli.lens import _inputs
    from lens_merge.config import load_recipe
    from lens_merge.guard import check_output
    from lens_merge.sweep import check_markers, expand_grid, parse_grid
    from lens_merge.sweep.runner import run_sweep

    r = load_recipe(recipe)
    axes = parse_grid(grid)
    n = len(expand_grid(r, axes))  # every key and value checked before any work
    if readme is not None:
        check_markers(readme)
    out = out or Path(r.output_dir) / f"{r.name}-sweep"
    check_output(out, _inputs(r, recipe=recipe, readme=readme), what="--out")
    run_n = min(n, points) if points else n
    console.print(f"sweep {r.name}: {n} grid points ({run_n} to run) -> {out}", highlight=False)

    def show(ev) -> None:
        what = "probe" if ev.kind == "probe" else f"point {ev.index + 1}/{ev.total} {ev.label}"
        cache = {"built": ", training cache built", "reused": ", cache reused",
                 None: ""}[ev.cache]
        secs = f", {ev.seconds:.1f}s" if ev.status == "ran" else ""
        mark = "[green]ran[/]" if ev.status == "ran" else "[dim]reused[/]"
        console.print(f"{escape(what)}: {mark}{cache}{secs}", highlight=False)

    res = run_sweep(r, axes, out, progress(), max_points=points, keep_deltas=keep_deltas,
                    on_event=show)
    # markdown, one line a row (a rich table of 10+ columns truncates every cell)
    console.print(res.table, markup=False, highlight=False, soft_wrap=True)
    console.print(f"{res.json_path}\n{res.table_path}\n{res.plot_path}", highlight=False)
    if readme is not None:
        from lens_merge.sweep import update_readme

        update_readme(readme, res.table)
        console.print(f"table written into {readme}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``sweep`` to the root app."""
    app.command("sweep")(sweep_cmd)
