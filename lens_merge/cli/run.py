"""CLI command: ``run RECIPE`` (the whole pipeline into one release folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lens_merge.cli._common import console, progress, table


def run_cmd(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe")],
    force: Annotated[list[str] | None, typer.Option("--force", help="redo STAGE (repeatable)")]
    = None,
    only: Annotated[list[str] | None, typer.Option("--only", help="run just STAGE (repeatable)")]
    = None,
    no_push: Annotated[bool, typer.Option("--no-push", help="never push, even with a repo_id")]
    = False,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o",
                                                    help="override the recipe's output_dir")]
    = None,
) -> None:
    """Run probe -> train -> eval -> fold -> verify -> exports -> card -> push."""
    from lens_merge.config import check_recipe, load_recipe, with_overrides
    from lens_merge.release.pipeline import run_recipe

    r = load_recipe(recipe)
    if output_dir:
        r = with_overrides(r, {"output_dir": str(output_dir)}, "--output-dir")
    check_recipe(r, stages=list(only) if only else None)  # fail before any stage starts

    def show(res):
        mark = {"ran": "[green]ran", "skipped": "[dim]skipped", "disabled": "[dim]disabled",
                "failed": "[red]failed"}[res.status]
        rss = f", peak RSS {res.peak_rss_mb / 1e3:.2f} GB" if res.peak_rss_mb else ""
        console.print(f"{mark}[/] {res.name} ({res.seconds:.1f}s{rss})")

    try:
        run_recipe(r, force=force, push=not no_push, only=only, progress=progress(),
                   on_stage=show)
    finally:
        _print_summary(r)


def _print_summary(r) -> None:
    """The eval table and the stage table of the release's run record, when readable.

    Runs in a ``finally``: an unreadable record is mentioned, never raised over the error
    that ended the run.
    """
    from lens_merge.cli.lens import report_table
    from lens_merge.errors import LensMergeError
    from lens_merge.records import ReleaseLayout, RunTable, read_json, read_record

    layout = ReleaseLayout(root=r.release_dir)
    runs = layout.path("run_table")
    if not runs.is_file():
        return
    try:
        rows = [x.model_dump() for x in read_record(runs, RunTable).stages]
        if any(x["name"] == "eval" and x["status"] == "ran" for x in rows):
            console.print(report_table(read_json(layout.path("eval_report"))))
    except (LensMergeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        console.print(f"run summary unavailable ({type(exc).__name__}: {exc})", style="dim",
                      highlight=False, markup=False)
        return
    console.print(table(f"lens-merge run {r.name} -> {r.release_dir}",
                        ["stage", "status", "seconds", "peak RSS GB", "numbers"],
                        [[x["name"], x["status"], f"{x['seconds']:.1f}",
                          f"{x['peak_rss_mb'] / 1e3:.2f}" if x.get("peak_rss_mb") else "",
                          _fmt(x["numbers"]) if not x.get("error")
                          else x["error"][:120]] for x in rows]))


def _fmt(numbers: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in numbers.items())


def register(app: typer.Typer) -> None:
    """Add ``run`` to the root app."""
    app.command("run")(run_cmd)
