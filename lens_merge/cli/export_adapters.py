"""CLI commands: ``lens-merge export gguf-lora`` (a llama.cpp LoRA adapter GGUF) and
``lens-merge export control-vector`` (a language direction as a llama.cpp control vector)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _report_path(out: Path, what: str) -> Path:
    """``F.gguf`` -> ``F.<what>.json`` beside it."""
    return out.with_name(f"{out.stem}.{what}.json")


def _print_parity(rep, title: str) -> None:
    from lens_merge.cli._common import print_parity

    rows = [[r["language"], r["n_tokens"], f"{r['max_abs_logit_diff']:.4g}",
             f"{r['top1_agreement']:.3f}", "yes" if r["first_token_match"] else "no",
             "yes" if r["generation_match"] else "no"] for r in rep.details.get("prompts", [])]
    print_parity(rep, title, rows, ["language", "tokens", "max |dlogit|", "top-1",
                                    "same first", "same greedy"])


def _write_parity(rep, out: Path) -> None:
    from lens_merge.cli._common import console
    from lens_merge.files import write_json_atomic
    from lens_merge.records import ParitySet

    path = _report_path(out, "parity")
    write_json_atomic(path, ParitySet(reports=[rep]).dump())
    console.print(f"report: {path}", highlight=False)


def gguf_lora_cmd(
    source: Annotated[Path, typer.Argument(help="Lens delta directory, or a PEFT LoRA folder "
                                           "from 'lens-merge export lora'.")],
    base: Annotated[str, typer.Option("--base", help="The base checkpoint the delta was "
                                      "trained on ('default' or a directory).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="The adapter .gguf to write.")],
    rank: Annotated[int | None, typer.Option("--rank", help="One rank for every tensor.")] = None,
    energy: Annotated[float | None, typer.Option(
        "--energy", help="Per tensor, the smallest rank keeping this fraction of the squared "
        "singular values (0-1]. Neither --rank nor --energy: full rank (exact).")] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", help="adapter.lora.alpha (default: "
                                                "the largest rank).")] = None,
    outtype: Annotated[str, typer.Option("--outtype", help="f32 or f16 A/B tensors.")] = "f32",
    verify: Annotated[bool, typer.Option("--verify", help="Run base GGUF + adapter and the "
                                         "folded GGUF in llama.cpp and compare.")] = False,
    base_gguf: Annotated[Path | None, typer.Option("--base-gguf", help="The base model's GGUF "
                                                   "(for --verify).")] = None,
    folded_gguf: Annotated[Path | None, typer.Option(
        "--folded-gguf", help="The folded model's GGUF of the same type (for --verify).")] = None,
    language: Annotated[list[str] | None, typer.Option(
        "--language", help="Verification prompt language (repeatable).")] = None,
    threads: Annotated[int, typer.Option("--threads", min=1, help="llama.cpp CPU threads for "
                                         "--verify.")] = 2,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file."
                                            )] = False,
) -> None:
    """Export a Lens delta as a llama.cpp LoRA adapter (llama-cli -m BASE.gguf --lora F.gguf)."""
    from lens_merge.adapters.gguf_lora import export_gguf_lora, verify_gguf_lora
    from lens_merge.cli._common import console, table
    from lens_merge.errors import VerificationError

    if verify and (base_gguf is None or folded_gguf is None):
        raise typer.BadParameter("--verify needs --base-gguf and --folded-gguf")
    rep = export_gguf_lora(source, base, out, rank=rank, energy=energy, alpha=alpha,
                           outtype=outtype, overwrite=overwrite)
    rows = [[r["gguf"], r["rank"], f"{r['shape'][0]}x{r['shape'][1]}",
             "-" if r["rel_error"] is None else f"{r['rel_error']:.3g}"] for r in rep["tensors"]]
    console.print(table(f"LoRA GGUF {rep['path']} ({rep['architecture']}, alpha "
                        f"{rep['alpha']:g})", ["tensor", "rank", "shape", "rel. error"], rows))
    console.print(f"{rep['bytes'] / 2**20:.2f} MiB ({rep['size_ratio']:.2f}x the fp32 delta); "
                  f"base hashes checked: {rep['base_checked']}", highlight=False)
    if verify:
        try:
            v = verify_gguf_lora(base_gguf, out, folded_gguf, languages=language or None,
                                 n_threads=threads)
        except VerificationError as exc:
            _print_parity(exc.report, "base + LoRA vs folded, llama.cpp")
            _write_parity(exc.report, out)
            raise typer.Exit(1) from None
        _print_parity(v, f"base + LoRA vs folded, llama.cpp ({v.variant})")
        _write_parity(v, out)


def control_vector_cmd(
    subspace: Annotated[Path, typer.Argument(help="Probe output directory (subspace.json).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="The control vector .gguf.")],
    language: Annotated[str, typer.Option("--language", help="The language to steer towards.")],
    layers: Annotated[str | None, typer.Option(
        "--layers", help="A-B, inclusive block indices (default 1 to n-2).")] = None,
    scale: Annotated[float, typer.Option("--scale", help="Multiplies every direction.")] = 1.0,
    model_hint: Annotated[str | None, typer.Option(
        "--model-hint", help="controlvector.model_hint (default: the probed model's GGUF "
        "architecture).")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Compare llama.cpp with the vector "
                                         "against transformers with forward hooks, and measure "
                                         "the reply-language effect.")] = False,
    checkpoint: Annotated[str | None, typer.Option("--checkpoint", help="The probed HF model "
                                                   "(for --verify).")] = None,
    gguf_model: Annotated[Path | None, typer.Option("--gguf", help="Its f32/f16 GGUF (for "
                                                    "--verify).")] = None,
    effect_scales: Annotated[str, typer.Option(
        "--effect-scales", help="Run-time scales of the effect table, comma separated.")
    ] = "0.05,0.1,0.2",
    threads: Annotated[int, typer.Option("--threads", min=1, help="llama.cpp CPU threads for "
                                         "--verify.")] = 2,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file."
                                            )] = False,
) -> None:
    """Export a language direction as a llama.cpp control vector (--control-vector F.gguf)."""
    from lens_merge.adapters.control_vector import (
        control_vector_effect,
        export_control_vector,
        verify_control_vector,
    )
    from lens_merge.cli._common import console, progress, table
    from lens_merge.errors import VerificationError

    if verify and (checkpoint is None or gguf_model is None):
        raise typer.BadParameter("--verify needs --checkpoint and --gguf")
    try:
        scales = tuple(float(s) for s in effect_scales.split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter(f"--effect-scales {effect_scales!r}: numbers, comma separated"
                                 ) from None
    rep = export_control_vector(subspace, out, language, layers=layers, scale=scale,
                                model_hint=model_hint, overwrite=overwrite)
    console.print(f"control vector {rep['path']}: {rep['language']}, layers "
                  f"{rep['layers'][0]}-{rep['layers'][1]}, scale {rep['scale']:g}, model hint "
                  f"{rep['model_hint']}, {rep['bytes']} bytes", highlight=False)
    if not verify:
        return
    try:
        v = verify_control_vector(checkpoint, gguf_model, out, n_threads=threads,
                                  progress=progress())
    except VerificationError as exc:
        _print_parity(exc.report, "llama.cpp + vector vs transformers + hooks")
        _write_parity(exc.report, out)
        raise typer.Exit(1) from None
    _print_parity(v, f"llama.cpp + vector vs transformers + hooks ({v.variant})")
    _write_parity(v, out)
    eff = control_vector_effect(gguf_model, out, language, scales=scales, checkpoint=checkpoint,
                                out=_report_path(out, "effect"), n_threads=threads,
                                progress=progress())
    console.print(table(f"replies in {language} ({eff['n_prompts']} held-out "
                        f"{eff['prompt_language']} prompts)", ["scale", f"share {language}",
                                                                f"share {eff['prompt_language']}"],
                        [[r["scale"], f"{r['share_in_language']:.2f}",
                          f"{r['share_in_prompt_language']:.2f}"] for r in eff["rows"]]))
    console.print(f"report: {_report_path(out, 'effect')}", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``gguf-lora`` and ``control-vector`` to the ``export`` group."""
    app.command("gguf-lora")(gguf_lora_cmd)
    app.command("control-vector")(control_vector_cmd)
