"""CLI command: ``lens-merge export lora DELTA -o DIR [--rank R | --energy E] [--base B]
[--verify]`` (a PEFT LoRA adapter folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _print_export(rep: dict) -> None:
    from lens_merge.cli._common import console, table

    rows = [[n.removesuffix(".weight"), "x".join(map(str, t["shape"])),
             f"{t['rank']}/{t['full_rank']}", f"{t['rel_error']:.3g}", f"{t['energy']:.4f}"]
            for n, t in rep["tensors"].items()]
    console.print(table("LoRA factors (dW ~= B @ A)", ["tensor", "shape", "rank", "rel. error",
                                                       "energy kept"], rows))
    extra = [[n, f"{r['norm']:.3g}", r["how"]] for n, r in rep["carried"].items()]
    extra += [[n, f"{r['norm']:.3g}", f"DROPPED: {r['reason']}"] for n, r in rep["dropped"].items()]
    if extra:
        console.print(table("1-D tensors (norms, biases)", ["tensor", "|dW|", "carried as"],
                            extra))
    s = rep["sizes"]
    ratio = f" ({s['ratio']:.3f} x the delta)" if s.get("ratio") else ""
    console.print(table("PEFT LoRA export", ["", "value"], [
        ["folder", rep["path"]], ["max rank", rep["max_rank"]],
        ["adapter", f"{s['adapter_bytes'] / 2**20:.2f} MiB{ratio}"],
        ["delta", f"{s['delta_bytes'] / 2**20:.2f} MiB"],
        ["target_modules", str(rep["config"]["target_modules"])],
        ["layers_to_transform", str(rep["config"]["layers_to_transform"])]]))


def _print_verify(rep) -> None:
    from lens_merge.cli._common import print_parity

    m = rep.metrics
    rows = [[r["language"], r["n_tokens"], f"{r['max_abs_logit_diff']:.4g}",
             f"{r['top1_agreement']:.3f}", f"{r['adapter_max_abs_logit_diff']:.3g}"]
            for r in rep.details.get("prompts", [])]
    title = (f"PeftModel.from_pretrained vs {rep.reference} ({rep.variant}): max |dlogit| "
             f"{m['max_abs_logit_diff']:.4g}, top-1 {m['top1_agreement']:.4f}, KL mean "
             f"{m['kl_mean']:.3g}")
    if m.get("dropped_max_abs_logit_diff") is not None:
        title += (f"; dropped tensors alone cost max |dlogit| "
                  f"{m['dropped_max_abs_logit_diff']:.4g}, top-1 {m['dropped_top1_agreement']:.4f}")
    print_parity(rep, title, rows, ["language", "tokens", "max |dlogit|", "top-1",
                                    "PEFT vs files"])


def _rank(value: str | None) -> int | None:
    from lens_merge.errors import AdapterError

    if value is None or value == "full":
        return None
    try:
        return int(value)
    except ValueError:
        raise AdapterError(f"--rank {value!r}: expected a positive integer or 'full'") from None


def _recorded_base(delta: Path) -> str | None:
    """The base the delta records (``default`` or an existing directory), else None."""
    from lens_merge.weights.delta import LensDelta

    base = LensDelta.load(delta).meta.get("base") or {}
    for ref in (base.get("ref"), base.get("path")):
        if ref == "default" or (ref and (Path(ref) / "config.json").is_file()):
            return str(ref)
    return None


def export_lora_cmd(
    delta: Annotated[Path, typer.Argument(help="Lens delta directory.")],
    out: Annotated[Path, typer.Option("--output", "-o", help="The adapter folder to write.")],
    rank: Annotated[str | None, typer.Option(
        "--rank", help="Rank of every tensor (an integer, or 'full': exact).")] = None,
    energy: Annotated[float | None, typer.Option(
        "--energy", help="Per tensor, the smallest rank keeping this fraction of the squared "
        "singular values (default 0.9 unless --rank is given).")] = None,
    base: Annotated[str | None, typer.Option(
        "--base", help="Base model ('default' or a directory; default: the one the delta "
        "records). Checked by hash; needed to carry norms and biases and to --verify.")] = None,
    drop_norms: Annotated[bool, typer.Option(
        "--drop-norms", help="Drop 1-D tensors (norms, biases) instead of carrying them "
        "(what a llama.cpp adapter holds).")] = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Compare PeftModel.from_pretrained(base, DIR) with base + delta.")
                      ] = False,
    language: Annotated[list[str] | None, typer.Option(
        "--language", help="Verification prompt language (repeatable; default: the delta's "
        "languages).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing folder."
                                            )] = False,
) -> None:
    """Export a Lens delta as a PEFT LoRA adapter (truncated SVD per linear weight)."""
    from lens_merge.adapters.factor import DEFAULT_ENERGY
    from lens_merge.adapters.peft_lora import export_peft_lora, verify_peft_lora
    from lens_merge.cli._common import console, progress
    from lens_merge.errors import AdapterError, VerificationError

    if rank is not None and energy is not None:
        raise AdapterError("give --rank or --energy, not both")
    r = _rank(rank)
    e = energy if energy is not None or rank is not None else DEFAULT_ENERGY
    base_ref = base or _recorded_base(delta)
    if base_ref is not None and base is None:
        console.print(f"base: {base_ref} (recorded in the delta)", highlight=False)
    rep = export_peft_lora(delta, out, rank=r, energy=e, base=base_ref, overwrite=overwrite,
                           carry=not drop_norms)
    _print_export(rep)
    if verify:
        if base_ref is None:
            raise AdapterError("--verify needs the base: pass --base")
        try:
            v = verify_peft_lora(base_ref, out, delta, languages=language or None,
                                 raise_on_failure=True, progress=progress())
        except VerificationError as exc:
            _print_verify(exc.report)
            raise typer.Exit(1) from None
        _print_verify(v)


def register(app: typer.Typer) -> None:
    """Add ``lora`` to the ``export`` group."""
    app.command("lora")(export_lora_cmd)
