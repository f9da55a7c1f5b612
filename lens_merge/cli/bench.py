"""CLI command: ``bench MODEL [--delta DELTA] --tasks t1,t2`` (lm-evaluation-harness scores of
the base and the Lens model; ``lens_merge.bench``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def bench_cmd(
    model: Annotated[str, typer.Argument(help="Base model: 'default' or a HF directory.")],
    tasks: Annotated[str, typer.Option(
        "--tasks", "-t", help="Comma-separated lm-eval task or group names, e.g. "
        "belebele_zho_Hans,xcopa_sw.")],
    delta: Annotated[Path | None, typer.Option(
        "--delta", help="Lens delta folder: score base + delta (in memory) beside the base.")]
    = None,
    include_path: Annotated[Path | None, typer.Option(
        "--include-path", help="Folder of local lm-eval task YAML files.")] = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", help="Documents per task (default: all).")] = None,
    num_fewshot: Annotated[int | None, typer.Option(
        "--num-fewshot", help="Few-shot examples (default: each task's own).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="lm-eval batch size.")] = 8,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1, mps, ...")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, bf16 or fp16.")] = "fp32",
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write the scores here as JSON (bench.json).")] = None,
) -> None:
    """Score the base (and base + delta) on lm-evaluation-harness tasks; print base vs Lens.

    Needs the ``bench`` extra. Hub tasks (belebele_*, xcopa_*, xstorycloze_*, ...) download
    their datasets; local YAML tasks need only --include-path.
    """
    from lens_merge.bench.run import run_bench, task_list
    from lens_merge.bench.summary import table_rows, worse
    from lens_merge.cli._common import console, progress, table
    from lens_merge.config import recipe_from

    cfg = recipe_from({"name": "bench", "device": device, "bench": {
        "tasks": task_list(tasks), "include_path": str(include_path) if include_path else None,
        "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size, "dtype": dtype}},
        "command-line options")
    b = cfg.bench
    rep = run_bench(model, delta, b.tasks, include_path=b.include_path, limit=b.limit,
                    num_fewshot=b.num_fewshot, batch_size=b.batch_size, device=cfg.device,
                    dtype=b.dtype, out=out, progress=progress())
    cols = ["task", "metric", "base", "lens", "lens - base"]
    if rep.delta is None:
        cols, rows = cols[:3], [r[:3] for r in table_rows(rep)]
    else:
        rows = table_rows(rep)
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in rep.seconds.items())
    console.print(table(f"lm-eval {rep.lm_eval_version}: {rep.model} ({secs})", cols, rows))
    for task, metric, s in worse(rep):
        console.print(f"{task} {metric}: Lens below the base by more than the standard error "
                      f"({s.base:.4f} -> {s.lens:.4f})", style="yellow", highlight=False)
    if out is not None:
        console.print(f"wrote {out}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``bench`` to the root app."""
    app.command("bench")(bench_cmd)
