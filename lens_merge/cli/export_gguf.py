"""CLI command: ``lens-merge export gguf CHECKPOINT -o OUT.gguf --outtype TYPE [--verify]``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

OUTTYPE_HELP = ("f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0 (pure Python); q6_k, q5_k_m, "
                "q4_k_m (llama.cpp's quantizer, needs the 'llama' extra).")


def _print_export(rep: dict) -> None:
    from lens_merge.cli._common import console, table

    types = ", ".join(f"{k} x{v}" for k, v in sorted(rep["tensor_types"].items()))
    rows = [["file", rep["path"]], ["output type", rep["label"]],
            ["size", f"{rep['bytes'] / 2**20:.1f} MiB"],
            ["tensors", f"{rep['n_tensors']} ({types})"],
            ["parameters", f"{rep['n_params']:,} ({rep['metadata']['size_label']})"],
            ["tokenizer", f"{rep['tokenizer']['model']} / pre={rep['tokenizer']['pre']}"],
            ["seconds", f"{rep['seconds']:.2f}"]]
    if rep["intermediate"]:
        rows.append(["quantized from", rep["intermediate"]])
    console.print(table("GGUF export", ["", "value"], rows))
    for fb in rep["fallbacks"]:
        console.print(f"[yellow]fallback[/] {fb['tensor']} {fb['shape']}: {fb['used']} "
                      f"instead of {fb['wanted']} ({fb['reason']})", highlight=False)


def _print_verify(rep) -> None:
    """A GGUF ``ParityReport``: one row per prompt, then the checks and the verdict."""
    from lens_merge.cli._common import print_parity

    rows = [[r["language"], r["n_tokens"], f"{r['max_abs_logit_diff']:.4g}",
             f"{r['top1_agreement']:.3f}", "yes" if r["tokenization_match"] else "NO",
             "yes" if r["first_token_match"] else "no",
             "yes" if r["generation_match"] else "no"] for r in rep.details.get("prompts", [])]
    print_parity(rep, f"llama.cpp vs transformers ({rep.variant}; chat template round-trip: "
                 f"{rep.details.get('chat_template_match')})", rows,
                 ["language", "tokens", "max |dlogit|", "top-1", "same tokens", "same first",
                  "same greedy"])


def export_gguf_cmd(
    checkpoint: Annotated[Path, typer.Argument(
        help="Folded HF checkpoint directory (or 'default').")],
    out: Annotated[Path, typer.Option("--output", "-o", help="The .gguf file to write.")],
    outtype: Annotated[str, typer.Option("--outtype", "-t", help=OUTTYPE_HELP)] = "f16",
    verify: Annotated[bool, typer.Option("--verify", help="Run the file in llama.cpp and "
                                         "compare with transformers (needs the 'llama' extra)."
                                         )] = False,
    tokenizer_pre: Annotated[str | None, typer.Option(
        "--tokenizer-pre", help="Force tokenizer.ggml.pre (e.g. llama-bpe, qwen2, smollm) when "
        "the pre-tokenizer is not recognized.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="general.name")] = None,
    license_: Annotated[str | None, typer.Option("--license", help="general.license")] = None,
    language: Annotated[list[str] | None, typer.Option(
        "--language", help="Verification prompt language (repeatable; default: the Lens "
        "languages in the checkpoint's lens_merge.json).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file."
                                            )] = False,
) -> None:
    """Export a checkpoint to GGUF for llama.cpp, optionally verifying it in llama.cpp."""
    from lens_merge.cli._common import progress
    from lens_merge.errors import ExportError, VerificationError
    from lens_merge.export.gguf import export_gguf, verify_gguf

    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it")
    meta = {k: v for k, v in (("name", name), ("license", license_)) if v}
    rep = export_gguf(checkpoint, out, outtype=outtype, tokenizer_pre=tokenizer_pre,
                      metadata=meta or None, progress=progress(), overwrite=overwrite)
    _print_export(rep)
    if verify:
        try:
            v = verify_gguf(checkpoint, out, languages=language or None, progress=progress())
        except VerificationError as exc:
            _print_verify(exc.report)
            raise typer.Exit(1) from None
        _print_verify(v)


def register(app: typer.Typer) -> None:
    """Add ``gguf`` to the ``export`` group."""
    app.command("gguf")(export_gguf_cmd)
