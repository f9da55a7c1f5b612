"""``export_onnx``: a checkpoint to an optimum-style ONNX folder, with an optional int8 graph.

Two exporters write the same folder (``model.onnx``, configs, tokenizer; optimum's IO names):

- ``dynamo`` (default): torch's dynamo exporter on a flat-KV wrapper (``_dynamo``), weights
  streamed to ``model.onnx_data``; peak about the model plus one weight at a time.
- ``optimum``: optimum's ``main_export`` (task ``text-generation-with-past``, TorchScript),
  which holds three copies of the initializers at once below 2 GB.

The export runs in a temporary sibling of the output; the graph is checked with
``onnx.checker``, optionally quantized (those steps run in a child process,
``_child.run_in_child``: the memory they hold goes back to the system before verification),
every file is hashed into ``lens_merge_export.json``, and the folder is renamed into place
(``lens_merge.files.atomic_dir``).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from lens_merge.errors import ExportError
from lens_merge.export.onnx._record import (
    FORMAT,
    GRAPH,
    INT8_GRAPH,
    PROVENANCE_FILE,
    files_record,
    graph_bytes,
    source_record,
)
from lens_merge.export.onnx.compat import TASK, check_exportable, require_optimum, versions
from lens_merge.export.onnx.quantize import INT8_METHODS, QUANTIZE, quantize_int8
from lens_merge.files import atomic_dir, write_json_atomic
from lens_merge.guard import check_output, check_writable_parent, cleanup_stale_temps, exists
from lens_merge.progress import NULL, Progress
from lens_merge.provenance import now_iso, tool_info

DTYPES = ("fp32", "fp16")
EXPORTERS = ("dynamo", "optimum")


def _check_options(dtype: str, quantize: str | None, int8_method: str, exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter {exporter!r} unknown; use one of {', '.join(EXPORTERS)}")
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} unknown; use one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise ExportError(f"quantize {quantize!r} unknown; use one of {', '.join(QUANTIZE)}")
    if quantize is not None and dtype != "fp32":
        raise ExportError(f"quantize {quantize!r} starts from the fp32 graph; export with "
                          f"dtype 'fp32' (got {dtype!r})")
    if int8_method not in INT8_METHODS:
        raise ExportError(f"int8 method {int8_method!r} unknown; use one of "
                          f"{', '.join(INT8_METHODS)}")


def export_onnx(
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: str = "fp32",
    quantize: str | None = None,
    overwrite: bool = False,
    progress: Progress = NULL,
    int8_method: str = "weight_only",
    exporter: str = "dynamo",
) -> dict[str, Any]:
    """Export a checkpoint to an optimum ONNX folder (graph with KV cache, configs, tokenizer).

    The folder loads with ``optimum.onnxruntime.ORTModelForCausalLM.from_pretrained(dir)``;
    the int8 graph with ``file_name="model_int8.onnx"``.

    Args:
        checkpoint: ``default`` or a local HF directory (e.g. a folded checkpoint).
        out_dir: the folder to create; written as a temporary sibling and renamed at the end.
        dtype: ``fp32`` or ``fp16`` weights and activations in the graph.
        quantize: ``int8`` to also write ``model_int8.onnx`` from the fp32 graph.
        overwrite: replace an existing ``out_dir``.
        progress: one tick per step (check, export, checker, quantize, provenance).
        int8_method: ``weight_only`` (MatMulNBits 8-bit weights, int8 compute) or
            ``dynamic`` (``quantize_dynamic``: int8 weights and run-time uint8 activations).
        exporter: ``dynamo`` (torch's dynamo exporter, weights streamed to external data) or
            ``optimum`` (optimum's ``main_export``, TorchScript; about 1 GB more at peak on
            the default model).

    Returns:
        The provenance record written to ``out_dir/lens_merge_export.json``.

    Raises:
        ExportError: unsupported architecture, bad option, existing output, exporter failure.
    """
    from lens_merge.models import resolve_model

    _check_options(dtype, quantize, int8_method, exporter)
    out = Path(out_dir).expanduser()
    src = resolve_model(checkpoint)
    check_output(out, {"checkpoint": src})
    check_writable_parent(out)
    cleanup_stale_temps(out)
    if exists(out) and not overwrite:
        raise ExportError(f"{out}: already exists (pass overwrite=True / --overwrite)")
    require_optimum("ONNX export", dynamo=exporter == "dynamo")
    steps = 4 + (quantize is not None)
    with progress.task(f"onnx export {src.name}", total=steps) as bar:
        info = check_exportable(src)
        bar.advance()
        with atomic_dir(out, overwrite=overwrite) as tmp:
            record = _export_into(src, tmp, (dtype, quantize, int8_method, exporter), info, bar)
        bar.advance()
    return record


def _run_exporter(src: Path, tmp: Path, dtype: str, model_type: str,
                  exporter: str = "dynamo") -> float:
    """``exporter`` (``dynamo``, or optimum's ``main_export``) into ``tmp``; returns seconds."""
    t0 = time.perf_counter()
    what = "torch dynamo" if exporter == "dynamo" else "optimum"
    try:
        with warnings.catch_warnings():
            # the tracers warn about every Python branch in transformers' cache and mask
            # code; the graph is verified against PyTorch instead of trusted on warnings
            warnings.filterwarnings("ignore", category=Warning,
                                    module=r"(torch|transformers|onnxscript|copyreg)\b")
            warnings.filterwarnings("ignore", message=r".*torch_dtype.* is deprecated")
            if exporter == "dynamo":
                from lens_merge.export.onnx._dynamo import export_dynamo

                export_dynamo(src, tmp, dtype)
            else:
                from optimum.exporters.onnx import main_export

                main_export(str(src), output=str(tmp), task=TASK, dtype=dtype, device="cpu",
                            do_validation=False, library_name="transformers",
                            local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - the exporters raise anything; name the model
        raise ExportError(f"{src}: {what} ONNX export ({model_type}, {TASK}, {dtype}) "
                          f"failed: {type(exc).__name__}: {str(exc)[:2000]}") from exc
    if not (tmp / GRAPH).is_file():
        raise ExportError(f"{tmp}: the exporter wrote no {GRAPH} "
                          f"(found: {', '.join(sorted(p.name for p in tmp.iterdir()))})")
    return time.perf_counter() - t0


def _opset(graph: Path) -> int | None:
    import onnx

    m = onnx.load(str(graph), load_external_data=False)
    return next((int(o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


def export_graph(src: str, tmp: str, dtype: str, model_type: str,
                 exporter: str = "dynamo") -> dict[str, Any]:
    """Export and check into ``tmp``: a child process's job (``_child.JOBS``); JSON in and out.

    Returns:
        ``export_seconds`` and ``external`` (the graph has external data).
    """
    import onnx

    src_p, tmp_p = Path(src), Path(tmp)
    export_s = _run_exporter(src_p, tmp_p, dtype, model_type, exporter)
    onnx.checker.check_model(str(tmp_p / GRAPH))  # path form: works for external data too
    external = any(p.name.startswith(GRAPH + "_data") for p in tmp_p.iterdir())
    return {"export_seconds": export_s, "external": external}


def quantize_graph(tmp: str, external: bool, int8_method: str) -> dict[str, Any]:
    """``model_int8.onnx`` from ``tmp/model.onnx``, checked: a child process's job of its own,
    so the quantizer's copy of the graph never meets the exporter's model in one process.

    Returns:
        The int8 options (``quantize_int8``), ``file`` and ``seconds``.
    """
    import onnx

    t1 = time.perf_counter()
    tmp_p = Path(tmp)
    opts = quantize_int8(tmp_p / GRAPH, tmp_p / INT8_GRAPH, external, int8_method)
    onnx.checker.check_model(str(tmp_p / INT8_GRAPH))
    return {"file": INT8_GRAPH, **opts, "seconds": round(time.perf_counter() - t1, 3)}


def _export_into(src: Path, tmp: Path, opts: tuple[str, str | None, str, str],
                 info: dict[str, Any], bar: Any) -> dict[str, Any]:
    """Export and check, then quantize (each in a child process), and record into the
    folder ``tmp``; ``opts`` is (dtype, quantize, int8_method, exporter)."""
    from lens_merge.export.onnx._child import run_in_child

    dtype, quantize, int8_method, exporter = opts
    got, export_peak = run_in_child("export_graph", src=str(src), tmp=str(tmp), dtype=dtype,
                                     model_type=info["model_type"], exporter=exporter)
    export_s, external = got["export_seconds"], got["external"]
    peaks = {"export": export_peak}
    bar.advance(2)  # export, checker
    quant: dict[str, Any] | None = None
    if quantize == "int8":
        quant, peaks["quantize"] = run_in_child("quantize_graph", tmp=str(tmp),
                                                external=external, int8_method=int8_method)
        bar.advance()
    graph = tmp / GRAPH
    files = files_record(tmp)
    fp_bytes = graph_bytes(GRAPH, files)
    if quant:
        quant["bytes"] = graph_bytes(INT8_GRAPH, files)
        quant["size_ratio_to_fp"] = round(quant["bytes"] / fp_bytes, 4)
    record = {
        "format": FORMAT, "format_version": 1, "created": now_iso(),
        "tool": {**tool_info(), **versions()},
        "source": source_record(src),
        "options": {"task": TASK, "exporter": exporter, "dtype": dtype, "quantize": quantize,
                    "device": "cpu",
                    "opset": _opset(graph), "external_data": external,
                    "kv_heads": info["kv_heads"], "head_dim": info["head_dim"]},
        "graph": GRAPH, "graph_bytes": fp_bytes, "quantized": quant,
        "files": files, "export_seconds": round(export_s, 3),
        "child_peak_rss": peaks,  # bytes, per child process (lens_merge.memory notes the max)
        "verification": None,  # a records.ParitySet dump once verify_onnx has run
    }
    write_json_atomic(tmp / PROVENANCE_FILE, record)
    return record
