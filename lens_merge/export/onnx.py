"""ONNX export through optimum-onnx, int8 quantization, and parity checks in ONNX Runtime.

Public API:
- ``export_onnx(checkpoint, out_dir, dtype, quantize, overwrite)``: ``optimum.exporters.onnx.
  main_export`` with task ``text-generation-with-past`` into a temporary sibling, optional
  ``model_int8.onnx`` (onnxruntime's quantization tools: 8-bit ``MatMulNBits`` weights by
  default, or ``quantize_dynamic``), ``lens_merge_export.json``, rename into place.
- ``verify_onnx(checkpoint, out_dir, ...)``: ONNX Runtime logits and KV-cache greedy generation
  (``ORTModelForCausalLM``) against transformers (eager, fp32); the result is recorded in the
  provenance file as ``verification`` (``passed``/``failed``).
- ``onnx_verification_status(dir)``: what the publisher checks before uploading.

The output loads with ``optimum.onnxruntime.ORTModelForCausalLM.from_pretrained(dir)``;
the int8 graph with ``file_name="model_int8.onnx"``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lens_merge.errors import ExportError, ModelError, VerificationError
from lens_merge.progress import NULL, Progress
from lens_merge.provenance import now_iso, ordinary_permissions, tool_info, write_json_atomic

TASK = "text-generation-with-past"
PROVENANCE_FILE = "lens_merge_export.json"
FORMAT = "lens-merge-onnx-export"
GRAPH = "model.onnx"
INT8_GRAPH = "model_int8.onnx"
DTYPES = ("fp32", "fp16")
QUANTIZE = ("int8",)
INT8_METHODS = ("weight_only", "dynamic")
# Max |logit difference| against transformers (fp32, eager) for one prompt:
# max(atol, rtol * max|reference logit|). Rounding noise grows with the logit scale: on
# SmolLM2-135M (|logit| up to 39) transformers' own eager and sdpa kernels differ by 9.4e-5
# and ORT fp32 by 1.3e-4, so a flat 1e-4 would sit on the noise floor (fp32 bound there:
# 3.9e-4). fp16 keeps 11 significant bits (one ulp is 0.031 at |logit| 32-64): measured 0.087.
TOLERANCES = {"fp32": {"atol": 1e-4, "rtol": 1e-5}, "fp16": {"atol": 5e-2, "rtol": 8e-3}}
STATUSES = ("passed", "failed", "not_run", "missing")
_VERSION_PACKAGES = ("optimum", "optimum-onnx", "onnx", "onnxruntime")


# --------------------------------------------------------------------------- support


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in _VERSION_PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _require_optimum(what: str) -> None:
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("optimum", "onnx", "onnxruntime")):
        raise ExportError(f"{what} needs optimum-onnx and onnxruntime "
                          "(pip install 'lens-merge[onnx]')")


def exporter_model_types() -> list[str]:
    """Model types optimum's ONNX exporter registers for ``text-generation-with-past``."""
    _require_optimum("ONNX export")
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    out = []
    for mt in sorted(TasksManager._SUPPORTED_MODEL_TYPE):
        try:
            tasks = TasksManager.get_supported_tasks_for_model_type(
                mt, exporter="onnx", library_name="transformers")
        except KeyError:
            continue
        if TASK in tasks:
            out.append(mt)
    return out


def model_cache_geometry(config) -> tuple[int, int]:
    """(KV heads, head dim) of a model's real attention cache, from its transformers config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(kv), int(head_dim)


def ort_cache_geometry(config) -> tuple[int, int]:
    """(KV heads, head dim) that the installed ``ORTModelForCausalLM`` feeds as empty past.

    Asked of the real class: it is built on a tiny probe graph with the given config, and
    its ``num_key_value_heads`` / ``embed_size_per_head`` are read back (optimum-onnx 0.1.0
    uses ``num_attention_heads`` and ``hidden_size // heads`` for phi3 and gemma2).
    """
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from optimum.onnxruntime import ORTModelForCausalLM

    dims = ["batch_size", "heads", "past_sequence_length", "head_dim"]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["b", "s"]),
              helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, dims),
              helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, dims)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"]),
               helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, dims),
               helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, dims)]
    nodes = [helper.make_node("Identity", ["input_ids"], ["logits"]),
             helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"]),
             helper.make_node("Identity", ["past_key_values.0.value"], ["present.0.value"])]
    graph = helper.make_graph(nodes, "kv_geometry_probe", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(model, str(path))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        probe = ORTModelForCausalLM(config=config, session=sess, model_save_dir=tmp)
        return int(probe.num_key_value_heads), int(probe.embed_size_per_head)


def check_exportable(model_dir: str | Path) -> dict:
    """Raise unless optimum can export the model and ORTModelForCausalLM can run the result.

    Returns:
        ``{"model_type", "kv_heads", "head_dim"}``.

    Raises:
        ExportError: naming the model type (or the mismatching config fields) and the
            supported model types.
    """
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{model_dir / 'config.json'}: cannot be read by transformers "
                         f"({exc})") from exc
    mt = config.model_type
    supported = exporter_model_types()
    from lens_merge import architectures

    ours = sorted({t for n in architectures.names() for t in architectures.get(n).model_types})
    if mt not in supported:
        raise ExportError(
            f"{model_dir / 'config.json'}: model_type {mt!r} is not supported by the ONNX "
            f"exporter (optimum-onnx {_versions().get('optimum-onnx', '?')}, task {TASK}). "
            f"Supported lens-merge architectures: {', '.join(t for t in ours if t in supported)}; "
            f"all exporter model types: {', '.join(supported)}")
    want, got = model_cache_geometry(config), ort_cache_geometry(config)
    if want != got:
        need = []
        if want[0] != got[0]:
            need.append("num_key_value_heads == num_attention_heads")
        if want[1] != got[1]:
            need.append("head_dim == hidden_size // num_attention_heads")
        raise ExportError(
            f"{model_dir / 'config.json'}: model_type {mt!r} with num_key_value_heads={want[0]}"
            f", head_dim={want[1]} cannot run in ORTModelForCausalLM (optimum-onnx "
            f"{_versions().get('optimum-onnx', '?')} builds its KV cache for {mt} with "
            f"{got[0]} heads of size {got[1]}: the exported graph would reject it). "
            f"A {mt} model exports when {' and '.join(need)}; supported lens-merge "
            f"architectures: {', '.join(t for t in ours if t in supported)}")
    return {"model_type": mt, "kv_heads": want[0], "head_dim": want[1]}


# --------------------------------------------------------------------------- export


def _temp_sibling(out: Path, tag: str) -> Path:
    return out.parent / f".{out.name}.{tag}-{uuid.uuid4().hex[:8]}"


def _file_sha256(path: Path) -> str:
    from lens_merge.checkpoint import file_sha256

    return file_sha256(path)


def _files_record(root: Path) -> dict[str, dict[str, Any]]:
    """Every file of an export (but the provenance file): bytes and sha256."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != PROVENANCE_FILE:
            out[p.relative_to(root).as_posix()] = {"bytes": p.stat().st_size,
                                                   "sha256": _file_sha256(p)}
    return out


def _graph_bytes(root: Path, graph: str, files: dict[str, dict]) -> int:
    """Size of a graph with its external data (``<graph>_data`` / ``<graph>.data``)."""
    stem = graph
    return sum(v["bytes"] for k, v in files.items()
               if k == stem or k.startswith(stem + "_data") or k.startswith(stem + ".data"))


def _source_record(checkpoint: Path) -> dict[str, Any]:
    rec: dict[str, Any] = {"path": str(checkpoint.resolve())}
    cfg = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    rec["model_type"] = cfg.get("model_type")
    rec["architectures"] = cfg.get("architectures")
    for name in ("lens_merge.json", "lens_merge_default.json"):
        p = checkpoint / name
        if p.is_file():
            try:
                rec[name] = json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                rec[name] = {"unreadable": str(p)}
    return rec


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Keep onnxruntime's quantization tools from configuring or using the root logger."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    nbits = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    nbits_level = nbits.level
    root.setLevel(logging.ERROR)
    nbits.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)
        nbits.setLevel(nbits_level)


def _quantize_int8(src: Path, dst: Path, external: bool, method: str) -> dict[str, Any]:
    """Write an int8 copy of ``src`` with onnxruntime's quantization tools.

    ``weight_only``: MatMulNBits with 8-bit symmetric weights in blocks of 128, activations
    stay float (SmolLM2-135M: top-1 0.96, KL 0.005 to fp32). ``dynamic``: ``quantize_dynamic``
    (per-channel QInt8 weights, uint8 activations quantized at run time per tensor), which
    outlier activations of small LLMs hurt (SmolLM2-135M: top-1 0.47, KL 1.0).
    """
    if method == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with _quiet_root_logger():  # it logs a pre-processing hint on the root logger
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             reduce_range=False, use_external_data_format=external)
        return {"method": "dynamic", "tool": "onnxruntime.quantization.quantize_dynamic",
                "weight_type": "QInt8", "per_channel": True, "activations": "uint8 dynamic"}
    import onnx

    # The module calls logging.basicConfig(level=INFO) when imported and logs every node.
    with _quiet_root_logger():
        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        except ImportError as exc:  # it imports onnx_ir, which onnxruntime does not require
            raise ExportError(f"int8 weight-only quantization needs {exc.name!r} "
                              "(pip install 'lens-merge[onnx]', which pins onnx-ir)") from exc
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=8, block_size=128,
                                         is_symmetric=True)
        quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=external)
    return {"method": "weight_only", "tool": "onnxruntime.quantization.matmul_nbits_quantizer."
            "MatMulNBitsQuantizer", "bits": 8, "block_size": 128, "symmetric": True,
            "activations": "float"}


def _opset(graph: Path) -> int | None:
    import onnx

    m = onnx.load(str(graph), load_external_data=False)
    return next((int(o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


def export_onnx(
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: str = "fp32",
    quantize: str | None = None,
    overwrite: bool = False,
    progress: Progress = NULL,
    int8_method: str = "weight_only",
) -> dict[str, Any]:
    """Export a checkpoint to an optimum ONNX folder (graph with KV cache, configs, tokenizer).

    Args:
        checkpoint: ``default`` or a local HF directory (e.g. a folded checkpoint).
        out_dir: the folder to create; written as a temporary sibling and renamed at the end.
        dtype: ``fp32`` or ``fp16`` weights and activations in the graph.
        quantize: ``int8`` to also write ``model_int8.onnx`` (dynamic int8 weights).
        overwrite: replace an existing ``out_dir``.
        progress: one tick per step (check, export, checker, quantize, provenance).
        int8_method: ``weight_only`` (MatMulNBits 8-bit weights, float activations) or
            ``dynamic`` (``quantize_dynamic``: int8 weights and run-time uint8 activations).

    Returns:
        The provenance record written to ``out_dir/lens_merge_export.json``.

    Raises:
        ExportError: unsupported architecture, bad option, existing output, exporter failure.
    """
    from lens_merge.models import resolve_model

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
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists (pass overwrite=True / --overwrite)")
    _require_optimum("ONNX export")
    src = resolve_model(checkpoint)
    steps = 4 + (quantize is not None)
    with progress.task(f"onnx export {src.name}", total=steps) as bar:
        info = check_exportable(src)
        bar.advance()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_sibling(out, "tmp")
        try:
            record = _export_into(src, tmp, dtype, quantize, int8_method, info, bar)
            _move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        bar.advance()
    return record


def _export_into(src: Path, tmp: Path, dtype: str, quantize: str | None, int8_method: str,
                 info: dict, bar) -> dict[str, Any]:
    import onnx
    from optimum.exporters.onnx import main_export

    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # the TorchScript tracer warns about every Python branch in transformers' cache and
            # mask code; the graph is verified against PyTorch instead of trusted on warnings
            warnings.filterwarnings("ignore", category=Warning, module=r"(torch|transformers)\.")
            warnings.filterwarnings("ignore", message=r".*torch_dtype.* is deprecated")
            main_export(str(src), output=str(tmp), task=TASK, dtype=dtype, device="cpu",
                        do_validation=False, library_name="transformers", local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - the exporter raises anything; name the model
        raise ExportError(f"{src}: optimum ONNX export ({info['model_type']}, {TASK}, {dtype}) "
                          f"failed: {type(exc).__name__}: {exc}") from exc
    export_s = time.perf_counter() - t0
    graph = tmp / GRAPH
    if not graph.is_file():
        raise ExportError(f"{tmp}: the exporter wrote no {GRAPH} "
                          f"(found: {', '.join(sorted(p.name for p in tmp.iterdir()))})")
    bar.advance()
    onnx.checker.check_model(str(graph))  # path form: works for external data too
    external = any(p.name.startswith(GRAPH + "_data") for p in tmp.iterdir())
    bar.advance()
    quant: dict[str, Any] | None = None
    if quantize == "int8":
        t1 = time.perf_counter()
        opts = _quantize_int8(graph, tmp / INT8_GRAPH, external, int8_method)
        onnx.checker.check_model(str(tmp / INT8_GRAPH))
        quant = {"file": INT8_GRAPH, **opts, "seconds": round(time.perf_counter() - t1, 3)}
        bar.advance()
    files = _files_record(tmp)
    sizes = {"fp": _graph_bytes(tmp, GRAPH, files)}
    if quant:
        sizes["int8"] = _graph_bytes(tmp, INT8_GRAPH, files)
        quant["bytes"] = sizes["int8"]
        quant["size_ratio_to_fp"] = round(sizes["int8"] / sizes["fp"], 4)
    record = {
        "format": FORMAT, "format_version": 1, "created": now_iso(),
        "tool": {**tool_info(), **_versions()},
        "source": _source_record(src),
        "options": {"task": TASK, "dtype": dtype, "quantize": quantize, "device": "cpu",
                    "opset": _opset(graph), "external_data": external,
                    "kv_heads": info["kv_heads"], "head_dim": info["head_dim"]},
        "graph": GRAPH, "graph_bytes": sizes["fp"], "quantized": quant,
        "files": files, "export_seconds": round(export_s, 3),
        "verification": {"status": "not_run"},
    }
    write_json_atomic(tmp / PROVENANCE_FILE, record)
    return record


def _move_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = _temp_sibling(out, "old")
        out.rename(old)
    ordinary_permissions(tmp)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- provenance


def read_export_record(out_dir: str | Path) -> dict[str, Any]:
    """The ``lens_merge_export.json`` of an export folder.

    Raises:
        ExportError: when the file is missing or unreadable.
    """
    p = Path(out_dir) / PROVENANCE_FILE
    if not p.is_file():
        raise ExportError(f"{p}: missing (not an ONNX export made by lens-merge)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ExportError(f"{p}: invalid JSON ({exc.msg})") from exc


def onnx_verification_status(out_dir: str | Path) -> str:
    """``passed``, ``failed``, ``not_run``, or ``missing`` (no readable provenance file).

    A folder whose files changed since verification reads ``failed``: only the bytes that
    were verified count as verified.
    """
    try:
        rec = read_export_record(out_dir)
    except ExportError:
        return "missing"
    ver = rec.get("verification") or {}
    status = ver.get("status", "not_run")
    if status not in STATUSES:
        return "failed"
    if status == "passed":
        root = Path(out_dir)
        for rel, f in (rec.get("files") or {}).items():
            p = root / rel
            if not p.is_file() or p.stat().st_size != f.get("bytes"):
                return "failed"
    return status



# --------------------------------------------------------------------------- verification


def _languages(src: Path, languages: list[str] | None) -> list[str]:
    if languages:
        return list(languages)
    p = src / "lens_merge.json"
    if p.is_file():
        try:
            prov = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            prov = {}
        delta = prov.get("delta") if isinstance(prov.get("delta"), dict) else {}
        langs = delta.get("languages") or prov.get("languages")
        if isinstance(langs, list) and langs:
            return [str(x) for x in langs]
    from lens_merge.config import DEFAULT_LANGUAGES

    return list(DEFAULT_LANGUAGES)


def _prompt_items(src: Path, languages: list[str] | None, prompts: list[str] | None,
                  per_language: int) -> list[tuple[str, str]]:
    if prompts:
        return [("custom", p) for p in prompts]
    from lens_merge.data import load_prompts

    langs = _languages(src, languages)
    ps = load_prompts("default", langs, split="heldout", max_samples=per_language)
    return [(lang, row[lang]) for row in ps.rows for lang in langs]


def _encode(tok, text: str):
    from lens_merge.hidden import encode

    enc = encode(tok, [text], max_length=4096, chat_template=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _greedy(model, enc: dict, max_new: int, eos: list[int], pad: int):
    """New token ids and the per-step logits [steps, vocab] of a greedy KV-cache run."""
    import torch

    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, temperature=None,
                             top_p=None, top_k=None, eos_token_id=eos, pad_token_id=pad,
                             return_dict_in_generate=True, output_logits=True)
    n = enc["input_ids"].shape[1]
    steps = torch.stack([x[0].float() for x in out.logits])
    return out.sequences[0, n:].tolist(), steps


def _kl_top1(ref, other) -> tuple[list[float], int]:
    """Per-position KL(ref || other) in nats and the count of equal argmaxes ([T, V] logits)."""
    import torch

    lp = torch.log_softmax(ref.double(), -1)
    lq = torch.log_softmax(other.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return kl.tolist(), int((ref.argmax(-1) == other.argmax(-1)).sum())


def _compare_generation(ref_tokens: list[int], ref_steps, tokens: list[int], steps,
                        tie_margin: float | None) -> dict[str, Any]:
    """Exactness of a greedy continuation; with ``tie_margin``, a divergence at a step whose
    reference top-2 margin is within it counts as a tie (fp16 only)."""
    n = min(len(ref_tokens), len(tokens))
    first = next((i for i in range(n) if ref_tokens[i] != tokens[i]), None)
    if first is None and len(ref_tokens) != len(tokens):
        first = n
    upto = n if first is None else min(first + 1, n)
    step_diff = float((ref_steps[:upto] - steps[:upto]).abs().max()) if upto else 0.0
    rec: dict[str, Any] = {"equal": first is None, "tokens": len(ref_tokens),
                           "first_mismatch": first, "kv_step_max_abs_logit_diff": step_diff,
                           "tie": False}
    if first is not None and first < len(ref_steps):
        top2 = ref_steps[first].topk(2).values
        rec["ref_top2_margin_at_mismatch"] = float(top2[0] - top2[1])
        rec["tie"] = tie_margin is not None and rec["ref_top2_margin_at_mismatch"] <= tie_margin
    return rec


def _load_ort(out: Path, file_name: str | None):
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    # Idle ORT threads spin by default and starve the interleaved PyTorch reference runs;
    # spinning changes speed only, never results.
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    kwargs = {"file_name": file_name} if file_name else {}
    return ORTModelForCausalLM.from_pretrained(str(out), session_options=so, **kwargs)


def _geometry_problem(model, rec: dict) -> str | None:
    shape = model.input_shapes.get("past_key_values.0.key")
    fed = (int(model.num_key_value_heads), int(model.embed_size_per_head))
    if not shape or not model.can_use_cache:
        return "the graph has no past_key_values inputs (no KV cache)"
    graph = tuple(d if isinstance(d, int) else None for d in (shape[1], shape[3]))
    if graph != fed:
        return (f"ORTModelForCausalLM feeds past_key_values as {fed[0]} heads x {fed[1]} but "
                f"the graph expects {graph[0]} x {graph[1]}")
    return None


def _tolerance(dtype: str, tolerance: float | None, scale: float) -> float:
    """Allowed max |logit diff| for a prompt whose reference logits reach ``scale``."""
    if tolerance is not None:
        return float(tolerance)
    t = TOLERANCES[dtype]
    return max(t["atol"], t["rtol"] * scale)


class _Tally:
    """Running numbers of one verification (per language, generations, int8)."""

    def __init__(self) -> None:
        self.per_lang: dict[str, dict[str, Any]] = {}
        self.gens: list[dict[str, Any]] = []
        self.worst = 0.0  # max over prompts of diff / tolerance
        self.positions = self.top1 = self.tok_mismatch = 0
        self.kl: list[float] = []
        self.q_kl: list[float] = []
        self.q_top1 = self.q_equal = 0
        self.q_prefix: list[float] = []


def _check_prompt(t: _Tally, lang: str, enc: dict, pt, fp, q, dtype: str,
                  tolerance: float | None, max_new: int, eos: list[int], pad: int) -> float:
    import torch

    with torch.inference_mode():
        ref = pt(**enc).logits[0].float()
        got = fp(**enc).logits[0].float()
    tol = _tolerance(dtype, tolerance, float(ref.abs().max()))
    diff = float((ref - got).abs().max()) if torch.isfinite(got).all() else math.inf
    kl, top1 = _kl_top1(ref, got)
    t.kl += kl
    t.top1 += top1
    t.positions += ref.shape[0]
    ref_new, ref_steps = _greedy(pt, enc, max_new, eos, pad)
    new, steps = _greedy(fp, enc, max_new, eos, pad)
    step_tol = _tolerance(dtype, tolerance, float(ref_steps.abs().max()))
    g = _compare_generation(ref_new, ref_steps, new, steps,
                            2 * step_tol if dtype == "fp16" else None)
    g.update(language=lang, tolerance=step_tol)
    t.gens.append(g)
    t.worst = max(t.worst, diff / tol, g["kv_step_max_abs_logit_diff"] / step_tol)
    d = t.per_lang.setdefault(lang, {"max_abs_logit_diff": 0.0, "tolerance": tol,
                                     "prompts": 0, "generations_equal": 0})
    d["max_abs_logit_diff"] = max(d["max_abs_logit_diff"], diff)
    d["tolerance"] = min(d["tolerance"], tol)
    d["prompts"] += 1
    d["generations_equal"] += int(g["equal"])
    if q is not None:
        with torch.inference_mode():
            ql = q(**enc).logits[0].float()
        kl, top1 = _kl_top1(ref, ql)
        t.q_kl += kl
        t.q_top1 += top1
        qnew, _ = _greedy(q, enc, max_new, eos, pad)
        same = next((i for i, (a, b) in enumerate(zip(ref_new, qnew, strict=False)) if a != b),
                    min(len(ref_new), len(qnew)))
        t.q_prefix.append(same / max(len(ref_new), 1))
        t.q_equal += int(qnew == ref_new)
    return diff


def verify_onnx(
    checkpoint: str | Path,
    out_dir: str | Path,
    languages: list[str] | None = None,
    prompts: list[str] | None = None,
    max_new_tokens: int = 32,
    tolerance: float | None = None,
    progress: Progress = NULL,
    prompts_per_language: int = 1,
    raise_on_failure: bool = True,
) -> dict[str, Any]:
    """Compare an ONNX export in ONNX Runtime with the checkpoint in transformers.

    For each prompt (chat template applied, batch 1): full-sequence logits of
    ``ORTModelForCausalLM`` vs transformers (eager attention, fp32), then greedy generation
    of ``max_new_tokens`` on both (ORT through its KV cache) compared token by token, with the
    per-step logits. The int8 graph, when present, reports top-1 agreement and KL to fp32.
    The result is written into the folder's provenance file as ``verification``.

    Args:
        checkpoint: the HF directory the folder was exported from (``default`` accepted).
        out_dir: the export folder.
        languages: languages whose default held-out prompts are used (default: the Lens
            languages of the checkpoint's ``lens_merge.json``, else the default recipe's).
        prompts: explicit prompts instead (language reported as ``custom``).
        max_new_tokens: greedy continuation length.
        tolerance: a fixed max |logit diff|; default per prompt
            ``max(atol, rtol * max|reference logit|)`` from ``TOLERANCES[dtype]``.
        progress: one tick per prompt.
        prompts_per_language: default prompts per language.
        raise_on_failure: raise VerificationError (carrying the report) on failure.

    Returns:
        The report (also stored in ``lens_merge_export.json``): ``status``,
        ``max_abs_logit_diff``, ``generation_match``, ``per_language``, ``int8``, ``problems``.

    Raises:
        VerificationError: when a check fails and ``raise_on_failure``.
        ExportError: when the folder is not a lens-merge ONNX export.
    """
    import torch

    from lens_merge.models import load_model, load_tokenizer, resolve_model

    _require_optimum("ONNX verification")
    out = Path(out_dir)
    rec = read_export_record(out)
    src = resolve_model(checkpoint)
    dtype = rec.get("options", {}).get("dtype", "fp32")
    t0 = time.perf_counter()
    problems: list[str] = []
    changed = [k for k, f in rec.get("files", {}).items()
               if not (out / k).is_file() or _file_sha256(out / k) != f.get("sha256")]
    if changed:
        problems.append(f"files changed since export: {', '.join(changed)}")
    items = _prompt_items(src, languages, prompts, prompts_per_language)
    tok_ref, tok = load_tokenizer(src), load_tokenizer(out)
    pt = load_model(src, "fp32")
    fp = _load_ort(out, None)  # what users get from from_pretrained(DIR)
    if fp.path.name != GRAPH:
        problems.append(f"from_pretrained({out}) loads {fp.path.name}, not {GRAPH}")
    geo = _geometry_problem(fp, rec)
    if geo:  # generation would crash inside ORT: record the failure and stop here
        problems.append(f"{geo}; the export cannot generate with its KV cache")
        report = {"status": "failed", "verified_at": now_iso(), "checkpoint": str(src),
                  "dtype": dtype, "problems": problems}
        return _finish(out, rec, report, raise_on_failure, t0)
    quant = rec.get("quantized")
    q = _load_ort(out, quant["file"]) if quant else None
    eos = pt.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [tok.eos_token_id])
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]

    t = _Tally()
    with progress.task("onnx verify", total=len(items)) as bar:
        for lang, text in items:
            enc = _encode(tok, text)
            if not torch.equal(enc["input_ids"], _encode(tok_ref, text)["input_ids"]):
                t.tok_mismatch += 1
            diff = _check_prompt(t, lang, enc, pt, fp, q, dtype, tolerance, max_new_tokens,
                                 eos, pad)
            bar.advance(max_abs=diff)
    report = _report(t, rec, src, dtype, tolerance, max_new_tokens, changed, problems)
    return _finish(out, rec, report, raise_on_failure, t0)


def _finish(out: Path, rec: dict, report: dict, raise_on_failure: bool, t0: float) -> dict:
    """Store the report in the provenance file; raise when it failed (and asked to)."""
    report["seconds"] = round(time.perf_counter() - t0, 3)
    rec["verification"] = report
    write_json_atomic(out / PROVENANCE_FILE, rec)
    if report["status"] != "passed" and raise_on_failure:
        numbers = (f" (max |logit diff| {report['max_abs_logit_diff']:.3g}, greedy equal "
                   f"{report['generations_equal']}/{report['prompts']})"
                   if "max_abs_logit_diff" in report else "")
        raise VerificationError(
            f"{out}: ONNX verification failed: {'; '.join(report['problems'])}{numbers}; the "
            f"folder is kept and marked failed in {PROVENANCE_FILE}", report)
    return report


def _report(t: _Tally, rec: dict, src: Path, dtype: str, tolerance: float | None,
            max_new: int, changed: list[str], problems: list[str]) -> dict[str, Any]:
    max_diff = max(d["max_abs_logit_diff"] for d in t.per_lang.values())
    step_diff = max(g["kv_step_max_abs_logit_diff"] for g in t.gens)
    n_equal = sum(g["equal"] for g in t.gens)
    n_ok = sum(g["equal"] or g["tie"] for g in t.gens)
    for lang, d in t.per_lang.items():
        if not d["max_abs_logit_diff"] <= d["tolerance"]:
            problems.append(f"{lang}: max |logit diff| {d['max_abs_logit_diff']:.3g} > "
                            f"tolerance {d['tolerance']:.3g}")
    for g in t.gens:
        if not g["kv_step_max_abs_logit_diff"] <= g["tolerance"]:
            problems.append(f"{g['language']}: KV-cache step max |logit diff| "
                            f"{g['kv_step_max_abs_logit_diff']:.3g} > {g['tolerance']:.3g}")
    if n_ok < len(t.gens):
        bad = [f"{g['language']}@{g['first_mismatch']}" for g in t.gens
               if not (g["equal"] or g["tie"])]
        problems.append(f"greedy generation differs for {len(t.gens) - n_ok}/{len(t.gens)} "
                        f"prompts (language@first differing token: {', '.join(bad)})")
    if t.tok_mismatch:
        problems.append(f"exported tokenizer encodes {t.tok_mismatch}/{len(t.gens)} prompts "
                        "differently from the checkpoint's")
    rule = ({"fixed": tolerance} if tolerance is not None else dict(TOLERANCES[dtype]))
    report: dict[str, Any] = {
        "status": "passed", "verified_at": now_iso(), "checkpoint": str(src),
        "dtype": dtype, "tolerance_rule": rule,
        "tolerance": min(d["tolerance"] for d in t.per_lang.values()),
        "worst_diff_to_tolerance": t.worst,
        "prompts": len(t.gens), "languages": list(t.per_lang), "max_new_tokens": max_new,
        "max_abs_logit_diff": max_diff, "kv_step_max_abs_logit_diff": step_diff,
        "top1_agreement": t.top1 / max(t.positions, 1),
        "kl_mean": sum(t.kl) / max(len(t.kl), 1),
        "generation_match": n_ok == len(t.gens), "generations_equal": n_equal,
        "generations_tie_excused": n_ok - n_equal,
        "per_language": t.per_lang, "generations": t.gens,
        "files_unchanged": not changed, "tokenizer_match": t.tok_mismatch == 0,
    }
    quant = rec.get("quantized")
    if quant:
        report["int8"] = {
            "file": quant["file"], "method": quant.get("method"), "bytes": quant.get("bytes"),
            "fp_bytes": rec.get("graph_bytes"), "size_ratio_to_fp": quant.get("size_ratio_to_fp"),
            "positions": t.positions, "top1_agreement": t.q_top1 / max(t.positions, 1),
            "kl_mean": sum(t.q_kl) / max(len(t.q_kl), 1), "kl_max": max(t.q_kl, default=0.0),
            "generations_equal": t.q_equal,
            "generation_prefix_match_mean": sum(t.q_prefix) / max(len(t.q_prefix), 1),
            "reference": "transformers fp32 logits (the fp32 model)",
        }
        if not all(math.isfinite(x) for x in t.q_kl):
            problems.append("int8 graph gives non-finite logits")
    report["problems"] = problems
    report["status"] = "failed" if problems else "passed"
    return report
