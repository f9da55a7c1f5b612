"""Can this checkpoint be exported to ONNX, and will ``ORTModelForCausalLM`` run the result?

- ``exporter_model_types()``: what optimum's ONNX exporter registers for ``TASK``.
- ``model_cache_geometry`` / ``ort_cache_geometry``: (KV heads, head dim) of the model's real
  cache, and of the empty past the installed ``ORTModelForCausalLM`` feeds.
- ``check_exportable(model_dir)``: both checks, with an error naming what to change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lens_merge.errors import ExportError, ModelError

TASK = "text-generation-with-past"
_VERSION_PACKAGES = ("optimum", "optimum-onnx", "onnx", "onnxruntime", "torch", "onnxscript",
                     "onnx-ir")


def versions() -> dict[str, str]:
    """Installed versions of the ONNX stack (packages that are not installed are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in _VERSION_PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def require_optimum(what: str, dynamo: bool = False) -> None:
    """Raise unless optimum-onnx, onnx and onnxruntime (and, for the dynamo exporter,
    onnxscript) are importable.

    Args:
        what: the operation that needs them (named in the error).
        dynamo: also require onnxscript (torch's dynamo exporter translates with it).

    Raises:
        ExportError: naming the extra to install.
    """
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("optimum", "onnx", "onnxruntime")):
        raise ExportError(f"{what} needs optimum-onnx and onnxruntime "
                          "(pip install 'lens-merge[onnx]')")
    if dynamo and importlib.util.find_spec("onnxscript") is None:
        raise ExportError(f"{what} with the dynamo exporter needs onnxscript (pip install "
                          "'lens-merge[onnx]'), or choose exporter 'optimum'")


def exporter_model_types() -> list[str]:
    """Model types optimum's ONNX exporter registers for ``text-generation-with-past``.

    Returns:
        The sorted model types.
    """
    require_optimum("ONNX export")
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


def model_cache_geometry(config: Any) -> tuple[int, int]:
    """(KV heads, head dim) of a model's real attention cache, from its transformers config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(kv), int(head_dim)


def ort_cache_geometry(config: Any) -> tuple[int, int]:
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


def check_exportable(model_dir: str | Path) -> dict[str, Any]:
    """Raise unless optimum can export the model and ORTModelForCausalLM can run the result.

    Args:
        model_dir: a local HF checkpoint directory.

    Returns:
        ``{"model_type", "kv_heads", "head_dim"}``.

    Raises:
        ModelError: when transformers cannot read the config.
        ExportError: naming the model type (or the mismatching config fields) and the
            supported model types.
    """
    from transformers import AutoConfig

    from lens_merge import architectures

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{cfg_path}: cannot be read by transformers ({exc})") from exc
    mt = config.model_type
    supported = exporter_model_types()
    ours = sorted({t for n in architectures.names() for t in architectures.get(n).model_types})
    ours_ok = ", ".join(t for t in ours if t in supported)
    exporter = f"optimum-onnx {versions().get('optimum-onnx', '?')}"
    if mt not in supported:
        raise ExportError(
            f"{cfg_path}: model_type {mt!r} is not supported by the ONNX exporter ({exporter}, "
            f"task {TASK}). Supported lens-merge architectures: {ours_ok}; "
            f"all exporter model types: {', '.join(supported)}")
    want, got = model_cache_geometry(config), ort_cache_geometry(config)
    if want != got:
        need = []
        if want[0] != got[0]:
            need.append("num_key_value_heads == num_attention_heads")
        if want[1] != got[1]:
            need.append("head_dim == hidden_size // num_attention_heads")
        raise ExportError(
            f"{cfg_path}: model_type {mt!r} with num_key_value_heads={want[0]}, "
            f"head_dim={want[1]} cannot run in ORTModelForCausalLM ({exporter} builds its KV "
            f"cache for {mt} with {got[0]} heads of size {got[1]}: the exported graph would "
            f"reject it). A {mt} model exports when {' and '.join(need)}; supported "
            f"lens-merge architectures: {ours_ok}")
    return {"model_type": mt, "kv_heads": want[0], "head_dim": want[1]}
