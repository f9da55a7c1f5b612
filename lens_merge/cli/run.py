"""CLI command: ``run RECIPE`` (the whole pipeline into one release folder)."""

from __future__ import annotations

import json
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
    from lens_merge.cli.lens import report_table
    from lens_merge.config import load_recipe
    from lens_merge.pipeline import run_recipe

    r = load_recipe(recipe)
    if output_dir:
        r.output_dir = str(output_dir)

    def show(res):
        mark = {"ran": "[green]ran", "skipped": "[dim]skipped", "disabled": "[dim]disabled",
                "failed": "[red]failed"}[res.status]
        console.print(f"{mark}[/] {res.name} ({res.seconds:.1f}s)")

    try:
        results = run_recipe(r, force=force, push=not no_push, only=only, progress=progress(),
                             on_stage=show)
    finally:
        runs = r.release_dir / "report" / "run.json"
        if runs.is_file():
            rows = json.loads(runs.read_text())
            if any(x["name"] == "eval" and x["status"] == "ran" for x in rows):
                report = r.release_dir / "report" / "lens_report.json"
                console.print(report_table(json.loads(report.read_text())))
            console.print(table(f"lens-merge run {r.name} -> {r.release_dir}",
                                ["stage", "status", "seconds", "numbers"],
                                [[x["name"], x["status"], f"{x['seconds']:.1f}",
                                  _fmt(x["numbers"]) if not x.get("error")
                                  else x["error"][:120]] for x in rows]))
    del results


def _fmt(numbers: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in numbers.items())


def register(app: typer.Typer) -> None:
    """Add ``run`` to the root app."""
    app.command("run")(run_cmd)
