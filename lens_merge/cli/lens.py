"""CLI commands: ``probe``, ``train`` and ``eval`` (the Lens stages)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lens_merge.cli._common import console, progress, table

Base = Annotated[str, typer.Option("--base", help="'default' or a local HF model directory")]
Langs = Annotated[str | None, typer.Option("--languages", "-l",
                                           help="comma-separated codes, English first")]
Recipe = Annotated[Path | None, typer.Option("--recipe", "-r", help="take settings from a recipe")]


def _recipe(path: Path | None, base: str | None, languages: str | None, **options):
    """The recipe (or the defaults) with the command's options applied and validated.

    ``options`` are dotted recipe keys with ``__`` for ``.`` (``data__probe="x.jsonl"``);
    None values are left out. A bad option is a ``ConfigError`` naming it.
    """
    from lens_merge.config import Recipe as R
    from lens_merge.config import load_recipe, with_overrides

    r = load_recipe(path) if path else R(name="cli")
    upd = {k.replace("__", "."): v for k, v in options.items() if v is not None}
    if base:
        upd["base"] = base
    if languages:
        upd["languages"] = [x.strip() for x in languages.split(",") if x.strip()]
    return with_overrides(r, upd, "command-line options") if upd else r


def _inputs(r, **paths) -> dict:
    """The inputs a Lens stage reads (for the output guard): base model, data, directories."""
    found = {k.replace("_", " "): v for k, v in paths.items() if v is not None}
    if r.base != "default":
        found["base model"] = r.base
    for key in ("probe", "train", "eval"):
        src = getattr(r.data, key)
        if src != "default":
            found[f"data.{key} source"] = src
    return found


def probe_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory")],
    base: Base = None,
    languages: Langs = None,
    recipe: Recipe = None,
    data: Annotated[str | None, typer.Option(help="probing texts (default: embedded)")] = None,
    pooling: Annotated[str | None, typer.Option(help="last | mean")] = None,
    rank: Annotated[int | None, typer.Option(help="language-specific rank (default L-1)")] = None,
) -> None:
    """Probe the language-agnostic direction and language-specific subspace at every layer."""
    from lens_merge.guard import check_output
    from lens_merge.lens import run as stages

    r = _recipe(recipe, base, languages, data__probe=data, probe__pooling=pooling,
                probe__rank=rank)
    check_output(out, _inputs(r), what="--out")
    sub = stages.run_probe(r, out, progress())
    ly = sub.layer(-1)
    console.print(f"probed {len(sub.languages)} languages x {sub.meta['num_layers']} layers, "
                  f"rank {sub.meta['rank']}, pooling {sub.meta['pooling']} -> {out}")
    rows = [[lang, sub.meta["sample_counts"][lang], float(ly.deltas[i].norm())]
            for i, lang in enumerate(sub.languages)]
    console.print(table("last layer", ["language", "samples", "|delta_l|"], rows))


def train_cmd(
    subspace: Annotated[Path, typer.Option("--subspace", "-s", help="probe output directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="delta output directory")],
    base: Base = None,
    languages: Langs = None,
    recipe: Recipe = None,
    data: Annotated[str | None, typer.Option(help="parallel prompts (default: embedded)")] = None,
    work_dir: Annotated[Path | None, typer.Option(help="cache and log directory")] = None,
    overwrite: bool = False,
) -> None:
    """Train the top K blocks with the Lens losses; write a Lens delta."""
    from lens_merge.guard import check_output
    from lens_merge.lens import run as stages
    from lens_merge.lens.probe import Subspace

    r = _recipe(recipe, base, languages, data__train=data)
    check_output(out, _inputs(r, subspace=subspace, work_dir=work_dir), what="--out",
                 overwrite=overwrite)
    sub = Subspace.load(subspace)
    res = stages.run_train(r, sub, work_dir or out.parent / (out.name + ".work"), progress())
    if res.delta is None:  # a non-main process under `accelerate launch`
        return
    res.delta.save(out, overwrite=overwrite)
    console.print(f"{res.steps} optimizer steps, cache {'reused' if res.cache_reused else 'built'}"
                  f"; delta with {len(res.delta.tensors)} tensors -> {out}")
    console.print(table("final losses", list(res.final_losses),
                        [[res.final_losses[k] for k in res.final_losses]]))


def eval_cmd(
    delta: Annotated[Path, typer.Argument(help="Lens delta directory")],
    subspace: Annotated[Path, typer.Option("--subspace", "-s", help="probe output directory")],
    out: Annotated[Path, typer.Option("--out", "-o", help="report directory")],
    base: Base = None,
    recipe: Recipe = None,
    data: Annotated[str | None, typer.Option(help="held-out prompts (default: embedded)")] = None,
) -> None:
    """Base vs base+delta on held-out prompts: writes lens_report.json and prints the table."""
    from lens_merge.guard import check_output
    from lens_merge.lens import run as stages
    from lens_merge.lens.probe import Subspace
    from lens_merge.weights.delta import LensDelta

    d = LensDelta.load(delta)
    r = _recipe(recipe, base, ",".join(d.languages), data__eval=data)
    check_output(out, _inputs(r, delta=delta, subspace=subspace), what="--out")
    report = stages.run_eval(r, d, Subspace.load(subspace), out, progress())
    stages.record_effect(delta, report)
    console.print(report_table(report))


def report_table(report: dict):
    """The eval table: one row per language, base -> lens."""
    rows = []
    for lang, m in report["per_language"].items():
        def arrow(k, m=m):
            b, lv = m.get(f"{k}_base"), m.get(f"{k}_lens")
            return "-" if b is None else f"{b:.3f} -> {lv:.3f}"
        rows.append([lang, arrow("agnostic_cosine"), arrow("agnostic_gap"),
                     arrow("own_direction"), arrow("fidelity")])
    s = report["summary"]
    t = table(f"Lens effect on {report['n_prompts']} held-out prompts per language "
              f"(English KL(base||lens) = {s['english_kl']:.4g}, "
              f"top-1 agreement {s['english_top1_agreement']:.1%})",
              ["language", "agnostic cos", "agnostic gap", "own direction", "fidelity"], rows)
    return t


def register(app: typer.Typer) -> None:
    """Add probe, train and eval to the root app."""
    app.command("probe")(probe_cmd)
    app.command("train")(train_cmd)
    app.command("eval")(eval_cmd)
