"""CLI command: ``plan RECIPE`` (the memory plan: every stage's peak before work starts)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lens_merge.cli._common import console, table


def plan_cmd(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe")],
    memory: Annotated[str | None, typer.Option(
        "--memory", help="memory of the device, e.g. 24GB (default: free GPU memory, or "
        "available RAM)")] = None,
    host_memory: Annotated[str | None, typer.Option(
        "--host-memory", help="host RAM, e.g. 64GB (default: available RAM)")] = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="plan for this device instead of the recipe's (cpu, cuda, ...)")] = None,
    config: Annotated[str | None, typer.Option(
        "--config", help="the base's shape: a config.json, a model directory or a shipped "
        "shape (llama3-8b, llama3-70b); default: the base's own config.json")] = None,
    terms: Annotated[bool, typer.Option("--terms", help="list each stage's terms")] = False,
) -> None:
    """Peak memory of every stage, the training cache on disk, and whether it fits.

    Exits 0 when every stage fits (or the memory is unknown), 1 when one does not.
    """
    from lens_merge.config import load_recipe, with_overrides
    from lens_merge.plan import format_size, plan_recipe

    updates = {k: v for k, v in {"plan.memory": memory, "plan.host_memory": host_memory,
                                 "device": device, "plan.config": config}.items()
               if v is not None}
    r = load_recipe(recipe)
    if updates:
        r = with_overrides(r, updates, "command-line options")
    p = plan_recipe(r, config=config)
    m, w = p.shape, p.workload
    rows = [[s.name, s.device, format_size(s.device_peak), format_size(s.host_peak),
             format_size(s.cache_disk), _mark(s)] for s in p.stages]
    console.print(table(
        f"memory plan: {r.name} on {r.device} (device {format_size(p.device_memory)}, "
        f"host {format_size(p.host_memory)})",
        ["stage", "on", "peak there", "host peak", "cache on disk", "fits?"], rows))
    for s in p.stages:
        if s.note:
            console.print(f"{s.name}: {s.note}", style="dim", highlight=False)
    console.print(f"base {m.name}: {m.model_type}, {m.params / 1e9:.2f} B parameters in "
                  f"{m.dtype}, {m.n_layers} blocks; {w.train_rows} training rows x "
                  f"{w.languages} languages x {w.max_length} tokens, top {w.top_k}, train "
                  f"{w.train_dtype}", highlight=False)
    for e in w.estimated:
        console.print(f"estimate: {e}", style="yellow", highlight=False)
    if terms:
        for s in p.stages:
            for where, ts in (("", s.device_terms), ("host ", s.host_terms)):
                for k, v in ts.items():
                    console.print(f"  {s.name:<12} {where}{k}: {format_size(v)}",
                                  highlight=False, markup=False)
    if p.fits is None:
        console.print("memory unknown for some stage: pass --memory / --host-memory",
                      style="yellow")
    if p.fits is False:
        console.print(f"does not fit: {p.refusal()}", style="red", highlight=False)
        raise typer.Exit(1)


def _mark(s) -> str:
    if s.fits is None:
        return "[yellow]?[/]"
    if s.fits:
        return "[green]yes[/]"
    return "[red]NO[/]" + (" (host)" if s.short == ("host",) else "")


def register(app: typer.Typer) -> None:
    """Add ``plan`` to the root app."""
    app.command("plan")(plan_cmd)
