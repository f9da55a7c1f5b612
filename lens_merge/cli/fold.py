"""CLI commands: ``fold``, ``unfold`` and ``verify`` (thin wrappers over
``lens_merge.weights.fold``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Out = Annotated[Path, typer.Option("--output", "-o", help="Output directory (must not exist "
                                   "unless --overwrite).")]
Link = Annotated[bool, typer.Option("--link", help="Hardlink unchanged shards instead of "
                                    "copying them (same filesystem only).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Accept a .bin (pickle) "
                                           "checkpoint, loaded with torch.load(weights_only=True)"
                                           "; the output is written as safetensors.")]
Delta = Annotated[Path, typer.Argument(help="Lens delta directory (lens_delta.json + "
                                       "lens_delta.safetensors).")]


def _print_report(rep) -> None:
    from lens_merge.cli._common import console, table

    rows = [["output", str(rep.out)],
            ["source", rep.base + (" (pickle, converted to safetensors)"
                                   if rep.converted_from_pickle else "")],
            ["changed tensors", rep.changed_tensors],
            ["rewritten shards", len(rep.rewritten)],
            ["copied shards", len(rep.copied)],
            ["linked shards", len(rep.linked)],
            ["max cast error", f"{rep.max_cast_error:.3g}"
             + (f" ({rep.max_cast_error_tensor})" if rep.max_cast_error_tensor else "")],
            ["seconds", f"{rep.seconds:.2f} (input checks {rep.check_seconds:.2f})"]]
    if rep.skipped_files:
        rows.append(["skipped weight files", ", ".join(rep.skipped_files)])
    if rep.restored_exact is not None:
        rows.append(["restored bit-exact", f"{len(rep.restored_exact)}/{rep.changed_tensors}"])
    if not rep.hashes_checked:
        rows.append(["hash check", "skipped (no fold provenance in the input)"])
    console.print(table(rep.operation, ["", "value"], rows))


def fold_cmd(
    base: Annotated[str, typer.Argument(help="Base model: 'default' or a HF directory.")],
    delta: Delta,
    out: Out,
    link: Link = False,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Fold a Lens delta into a standalone checkpoint (W + dW, streamed shard by shard)."""
    from lens_merge.cli._common import progress
    from lens_merge.weights.fold import fold

    rep = fold(base, delta, out, link=link, overwrite=overwrite, allow_pickle=allow_pickle,
               progress=progress())
    _print_report(rep)


def unfold_cmd(
    folded: Annotated[Path, typer.Argument(help="A folded checkpoint directory.")],
    delta: Delta,
    out: Out,
    link: Link = False,
    overwrite: Overwrite = False,
    allow_pickle: AllowPickle = False,
) -> None:
    """Recover the base from a folded checkpoint (W = folded - dW)."""
    from lens_merge.cli._common import progress
    from lens_merge.weights.fold import unfold

    rep = unfold(folded, delta, out, link=link, overwrite=overwrite, allow_pickle=allow_pickle,
                 progress=progress())
    _print_report(rep)


def verify_cmd(
    base: Annotated[str, typer.Argument(help="Base model: 'default' or a HF directory.")],
    delta: Delta,
    folded: Annotated[Path, typer.Argument(help="The folded checkpoint directory.")],
    languages: Annotated[str | None, typer.Option(
        "--languages", "-l", help="Comma-separated language codes; default: the delta's.")] = None,
    tolerance: Annotated[float | None, typer.Option(
        help="Max |logit difference|; default by dtype (fp32 1e-4).")] = None,
    n_per_language: Annotated[int, typer.Option(help="Held-out prompts per language.")] = 2,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the numbers "
                                                  "to this JSON file.")] = None,
    allow_pickle: AllowPickle = False,
) -> None:
    """Compare base + delta (in memory) with the folded checkpoint; exit 1 above tolerance."""
    from lens_merge.cli._common import err_console, print_parity, progress
    from lens_merge.files import write_json_atomic
    from lens_merge.weights.fold import verify_fold

    langs = [x.strip() for x in languages.split(",") if x.strip()] if languages else None
    rep = verify_fold(base, delta, folded, languages=langs, tolerance=tolerance,
                      progress=progress(), n_per_language=n_per_language,
                      allow_pickle=allow_pickle, raise_on_failure=False)
    rows = [[lang, v["max_abs_logit_diff"], v["top1_agreement"]]
            for lang, v in rep.per_language.items()]
    rows.append(["all", rep.metrics["max_abs_logit_diff"], rep.metrics["top1_agreement"]])
    print_parity(rep, f"fold verification ({rep.variant}, {rep.n_prompts} prompts)", rows,
                 ["language", "max |logit diff|", "top-1 agreement"])
    if json_out is not None:
        write_json_atomic(json_out, rep.dump())
    if not rep.passed:
        err_console.print(f"[bold red]verification failed:[/] {rep.subject}: "
                          f"{'; '.join(rep.failures)}", highlight=False)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``fold``, ``unfold`` and ``verify`` to the root app."""
    app.command("fold")(fold_cmd)
    app.command("unfold")(unfold_cmd)
    app.command("verify")(verify_cmd)
