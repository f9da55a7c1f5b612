"""CLI command: ``lens-merge export onnx`` (thin wrapper over lens_merge.export.onnx)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from lens_merge.records import ParitySet


def _print_export(rec: dict, out: Path) -> None:
    from lens_merge.cli._common import console, table

    mb = 1024 * 1024
    rows = [["output", str(out)], ["source", rec["source"]["path"]],
            ["model_type", rec["source"].get("model_type")],
            ["dtype", rec["options"]["dtype"]], ["opset", rec["options"]["opset"]],
            ["graph", f"{rec['graph']} ({rec['graph_bytes'] / mb:.1f} MiB)"
                      + (" + external data" if rec["options"]["external_data"] else "")],
            ["export seconds", f"{rec['export_seconds']:.1f}"]]
    q = rec.get("quantized")
    if q:
        rows += [["int8 graph", f"{q['file']} ({q['method']}, {q['bytes'] / mb:.1f} MiB, "
                                f"{q['size_ratio_to_fp']:.2f}x of {rec['options']['dtype']})"],
                 ["quantize seconds", f"{q['seconds']:.1f}"]]
    console.print(table("ONNX export", ["", "value"], rows))


def _print_verify(result: ParitySet) -> None:
    """The per-language table, then each graph's checks and verdict (``print_parity``)."""
    from lens_merge.cli._common import print_parity

    fp = result.reports[0]
    q = next((r for r in result.reports[1:] if r.variant == "int8"), None)
    if "max_abs_logit_diff" not in fp.metrics:  # stopped before comparing (KV cache shape)
        print_parity(result)
        return
    columns = ["language", "max |logit diff|", "tolerance",
               f"greedy {fp.details['max_new_tokens']} equal"]
    if q is not None:
        columns += ["int8 KL", "int8 greedy equal"]
    rows = []
    for lang, d in fp.per_language.items():
        row = [lang, f"{d['max_abs_logit_diff']:.3g}", f"{d['tolerance']:.3g}",
               f"{d['generations_equal']}/{d['prompts']}"]
        if q is not None:
            qd = q.per_language.get(lang, {})
            row += [f"{qd.get('kl_mean', float('nan')):.3g}",
                    f"{qd.get('generations_equal', 0)}/{qd.get('prompts', 0)}"]
        rows.append(row)
    print_parity(result, f"ONNX Runtime vs transformers ({fp.variant})", rows, columns)


def onnx_cmd(
    checkpoint: Annotated[str, typer.Argument(help="'default' or a HF directory (e.g. a "
                                              "folded checkpoint).")],
    out: Annotated[Path, typer.Option("--output", "-o", help="Output directory (must not "
                                      "exist unless --overwrite).")],
    dtype: Annotated[str, typer.Option("--dtype", help="Graph precision: fp32 or fp16.")]
    = "fp32",
    quantize: Annotated[str | None, typer.Option(
        "--quantize", help="int8: also write model_int8.onnx beside the fp32 graph.")] = None,
    int8_method: Annotated[str, typer.Option(
        "--int8-method", help="weight_only (8-bit MatMulNBits weights, int8 compute) or "
        "dynamic (onnxruntime quantize_dynamic, per-tensor uint8 activations).")] = "weight_only",
    exporter: Annotated[str, typer.Option(
        "--exporter", help="dynamo (torch's dynamo exporter, weights streamed to "
        "model.onnx_data) or optimum (optimum's main_export; more memory).")] = "dynamo",
    verify: Annotated[bool, typer.Option("--verify", help="Compare ONNX Runtime with "
                                         "transformers (logits, greedy KV-cache generation); "
                                         "exit 1 on failure.")] = False,
    languages: Annotated[str | None, typer.Option(
        "--languages", help="Comma-separated languages for --verify (default: the delta's, "
        "else the default recipe's).")] = None,
    tolerance: Annotated[float | None, typer.Option(
        "--tolerance", help="A fixed max |logit diff| (default per prompt: fp32 max(1e-4, "
        "1e-5 x max|logit|), fp16 max(5e-2, 8e-3 x max|logit|)).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1,
                                                help="Greedy tokens compared.")] = 32,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
    = False,
) -> None:
    """Export to ONNX (optimum's text-generation-with-past graph) with an optional int8 graph."""
    from pydantic import ValidationError

    from lens_merge.cli._common import err_console, progress
    from lens_merge.config import OnnxConfig
    from lens_merge.errors import ConfigError, VerificationError
    from lens_merge.export.onnx import export_onnx, verify_onnx

    try:
        opts = OnnxConfig(dtype=dtype, quantize=quantize, verify=verify, exporter=exporter)
    except ValidationError as exc:
        raise ConfigError("; ".join(f"--{e['loc'][0]}: {e['msg']}" for e in exc.errors())) \
            from None
    rec = export_onnx(checkpoint, out, dtype=opts.dtype, quantize=opts.quantize,
                      overwrite=overwrite, progress=progress(), int8_method=int8_method,
                      exporter=opts.exporter)
    _print_export(rec, out)
    if not opts.verify:
        return
    langs = [x.strip() for x in languages.split(",") if x.strip()] if languages else None
    try:
        rep = verify_onnx(checkpoint, out, languages=langs, max_new_tokens=max_new_tokens,
                          tolerance=tolerance, progress=progress())
    except VerificationError as exc:
        _print_verify(exc.report)
        err_console.print(f"[bold red]verification failed:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    _print_verify(rep)


def register(app: typer.Typer) -> None:
    """Add this module's command to the ``export`` group."""
    app.command("onnx")(onnx_cmd)
