"""The ``dynamo`` exporter: torch's ``torch.onnx.export(..., dynamo=True)`` on a flat-KV wrapper.

It writes the graph optimum's ``main_export`` writes (inputs ``input_ids``, ``attention_mask``,
``position_ids``, ``past_key_values.{i}.key/.value``; outputs ``logits``, ``present.{i}.*``;
dynamic batch, sequence and past axes, an empty past for the first step) at about one copy
of the weights: optimum 2.1 / optimum-onnx 0.1 run the TorchScript exporter, whose C++ side
holds the ModelProto, its serialized string and the Python bytes at once below 2 GB (SmolLM2-
135M: 3.0 GB peak for 0.6 GB of initializers). Here the graph is an ``onnx_ir`` model whose
initializers are the torch parameters themselves; each linear weight's transpose is a lazy
tensor computed when ``onnx_ir.save`` streams it into ``model.onnx_data``, one at a time.

- ``export_dynamo(src, out, dtype)``: the graph, configs and tokenizer files into ``out``.
- ``fold_weight_transposes(model, aliases)``: ``Transpose(weight)`` -> a lazy transposed
  initializer (what ``MatMulNBitsQuantizer`` needs as the MatMul's B), named after the weight.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

OPSET = 18  # what optimum-onnx 0.1 writes; onnxruntime >= 1.14 runs it
# dummy sizes of the traced call: above 1, so torch.export keeps every axis symbolic
_BATCH, _SEQ, _PAST = 2, 3, 5
_PREFIX = "model."  # the wrapper's attribute holding the transformers model
TOTAL = "past_sequence_length + sequence_length"


def _flat_kv(model: Any) -> Any:
    """A module taking (input_ids, attention_mask, position_ids, [(key, value)] * layers) and
    returning (logits, key_0, value_0, ...): the model over a ``DynamicCache`` it fills."""
    import torch
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class FlatKV(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.model = inner

        def forward(self, input_ids, attention_mask, position_ids, past):  # noqa: ANN001
            cache = DynamicCache()
            cache.layers = []
            for key, value in past:  # filled directly: no lazy init, no cat onto an empty 1-D
                layer = DynamicLayer()
                layer.dtype, layer.device = key.dtype, key.device
                layer.keys, layer.values, layer.is_initialized = key, value, True
                cache.layers.append(layer)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=cache, use_cache=True)
            flat = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *flat)

    return FlatKV(model).eval()


def _long_rope(rope: Any) -> Any:
    """A stand-in for a ``longrope`` rotary embedding that picks the long or short factors in
    the graph (``torch.where`` on the largest position) instead of a Python branch on a tensor,
    which torch.export cannot trace (TorchScript bakes the traced branch in)."""
    import torch

    cfg = rope.config
    limit = getattr(cfg, "original_max_position_embeddings", None) or cfg.max_position_embeddings
    long_inv, _ = rope.rope_init_fn(cfg, rope.original_inv_freq.device, seq_len=limit + 1)

    class LongRope(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("short", rope.original_inv_freq.clone(), persistent=False)
            self.register_buffer("long", long_inv, persistent=False)
            self.scaling, self.limit = rope.attention_scaling, limit

        def forward(self, x, position_ids):  # noqa: ANN001 - transformers' rotary forward
            inv = torch.where(position_ids.max() + 1 > self.limit, self.long, self.short)
            inv = inv[None, :, None].float().expand(position_ids.shape[0], -1, 1)
            freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            return ((emb.cos() * self.scaling).to(x.dtype),
                    (emb.sin() * self.scaling).to(x.dtype))

    return LongRope()


@contextmanager
def _exportable(model: Any) -> Iterator[None]:
    """Swap rotary embeddings that branch on tensor values (``longrope``) for traceable ones."""
    swapped = []
    for name, mod in list(model.named_modules()):
        if "longrope" in str(getattr(mod, "rope_type", "")) and hasattr(mod, "rope_init_fn"):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            swapped.append((parent, attr, mod))
            setattr(parent, attr, _long_rope(mod))
    try:
        yield
    finally:
        for parent, attr, mod in swapped:
            setattr(parent, attr, mod)


def _dummy(config: Any, dtype: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Example inputs and their dynamic axes."""
    import torch
    from torch.export import Dim

    from lens_merge.export.onnx.compat import model_cache_geometry

    kv, head_dim = model_cache_geometry(config)
    n = config.num_hidden_layers
    ids = torch.randint(0, config.vocab_size, (_BATCH, _SEQ))
    mask = torch.ones(_BATCH, _PAST + _SEQ, dtype=torch.int64)
    pos = torch.arange(_PAST, _PAST + _SEQ)[None].expand(_BATCH, -1)
    past = [(torch.randn(_BATCH, kv, _PAST, head_dim, dtype=dtype),
             torch.randn(_BATCH, kv, _PAST, head_dim, dtype=dtype)) for _ in range(n)]
    b, s, p = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
    axes = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: Dim.DYNAMIC},
            "position_ids": {0: b, 1: s}, "past": [({0: b, 2: p}, {0: b, 2: p})] * n}
    return (ids, mask, pos, past), axes


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """optimum's input and output names of a decoder with ``n_layers`` KV-cache layers."""
    kv = [(i, t) for i in range(n_layers) for t in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids"]
            + [f"past_key_values.{i}.{t}" for i, t in kv],
            ["logits"] + [f"present.{i}.{t}" for i, t in kv])


def _aliases(model: Any) -> dict[str, list[str]]:
    """Each parameter name of the wrapper (as the graph has it) -> every name of that tensor
    (tied weights share one)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n: g for g in groups.values() for n in g}


def fold_weight_transposes(model: Any, aliases: dict[str, list[str]]) -> int:
    """Replace each 2-D ``Transpose`` that is its initializer's only reader with a lazy
    transposed initializer of the weight's name (the source is dropped).

    A tied embedding (read by ``Gather`` and, transposed, by lm_head's ``MatMul``) stays one
    tensor under its first name (``model.embed_tokens.weight``), as in optimum's graph: the
    file holds it once, and int8 weight-only quantization leaves lm_head in float, as there.
    Other initializers lose the wrapper's ``model.`` prefix.

    Args:
        model: an ``onnx_ir.Model``, changed in place.
        aliases: ``_aliases`` of the wrapped module.

    Returns:
        The number of transposes folded.
    """
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    folded, sources = 0, {}
    for node in list(graph):
        src = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if src is None or not src.is_initializer() or src.const_value is None:
            continue
        if len(src.uses()) > 1:  # a tied embedding (Gather + lm_head): one stored copy
            continue
        perm = node.attributes.get("perm")
        if len(src.const_value.shape) != 2 or (perm is not None and list(perm.as_ints()) != [1, 0]):
            continue
        tensor = src.const_value

        def compute(t: Any = tensor) -> Any:
            return ir.Tensor(np.ascontiguousarray(t.numpy().T))

        shape = ir.Shape(list(reversed(tensor.shape.dims)))
        names = aliases.get(src.name, [src.name])
        new = ir.Value(name=f"{names[0]}.__folded__", shape=shape,
                       type=ir.TensorType(tensor.dtype),
                       const_value=ir.LazyTensor(compute, dtype=tensor.dtype, shape=shape))
        graph.register_initializer(new)
        node.outputs[0].replace_all_uses_with(new)
        graph.remove(node, safe=True)
        sources[src.name] = src
        folded += 1
    for name in sources:
        graph.initializers.pop(name)
    _rename(graph, aliases)
    return folded


def _rename(graph: Any, aliases: dict[str, list[str]]) -> None:
    """Initializer names without the wrapper prefix (see ``fold_weight_transposes``)."""
    for value in list(graph.initializers.values()):
        old = value.name
        if old.endswith(".__folded__"):
            new = old.removesuffix(".__folded__")
        else:
            new = aliases.get(old, [old])[0]
        new = new.removeprefix(_PREFIX) if new.startswith(_PREFIX) else new
        if new != old:
            graph.initializers.pop(old)
            value.name = new
            graph.register_initializer(value)


def _optimize(model: Any) -> None:
    """onnxscript's ``optimize_ir`` without its pattern rewriter: constant folding, unused
    nodes, constants lifted to initializers, deduplication, CSE; then the per-node metadata
    (torch's stack traces: most of ``model.onnx``) cleared. The rewriter's matching took half
    of the export on SmolLM2 (30 blocks); onnxruntime fuses at session start anyway."""
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript import optimizer

    common.InlinePass()(model)
    for _ in range(2):
        optimizer.fold_constants(model)
        common.RemoveUnusedNodesPass()(model)
    ir.passes.Sequential(
        common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(), common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(), common.NameFixPass(),
        common.ClearMetadataAndDocStringPass())(model)  # torch's per-node stack traces


def _finish(model: Any) -> None:
    """optimum's axis name for the mask and the presents' length."""
    import onnx_ir as ir

    total = ir.SymbolicDim(TOTAL)
    for v in model.graph.inputs:
        if v.name == "attention_mask" and v.shape is not None:
            v.shape = ir.Shape([v.shape[0], total])
    for v in model.graph.outputs:
        if v.name.startswith("present.") and v.shape is not None:
            v.shape = ir.Shape([v.shape[0], v.shape[1], total, v.shape[3]])


def _save_side_files(model: Any, src: Path, out: Path) -> None:
    """config.json, generation_config.json and the tokenizer files, as optimum writes them."""
    from optimum.utils.save_utils import maybe_save_preprocessors

    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    maybe_save_preprocessors(str(src), out)


def export_dynamo(src: Path, out: Path, dtype: str) -> None:
    """Export ``src`` into the folder ``out``: ``model.onnx`` + ``model.onnx_data``, configs,
    tokenizer files.

    Args:
        src: a local HF checkpoint.
        out: an existing, empty folder.
        dtype: ``fp32`` or ``fp16``.

    Raises:
        Exception: whatever transformers, torch.export or the ONNX translation raise (the
            caller names the model).
    """
    import onnx_ir as ir
    import torch
    from transformers import AutoModelForCausalLM

    from lens_merge.export.onnx._record import GRAPH

    tdtype = torch.float16 if dtype == "fp16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=tdtype, local_files_only=True,
                                                 attn_implementation="sdpa").eval()
    model.config.use_cache = True
    wrapper = _flat_kv(model)
    args, axes = _dummy(model.config, tdtype)
    names_in, names_out = io_names(model.config.num_hidden_layers)
    with torch.no_grad(), _exportable(wrapper):
        prog = torch.onnx.export(wrapper, args, dynamo=True, dynamic_shapes=axes,
                                 input_names=names_in, output_names=names_out,
                                 opset_version=OPSET, optimize=False, external_data=True,
                                 verbose=False)
    graph = prog.model
    fold_weight_transposes(graph, _aliases(wrapper))
    _optimize(graph)
    _finish(graph)
    graph.producer_name = "lens-merge (torch.onnx dynamo)"
    graph.producer_version = torch.__version__
    ir.save(graph, str(out / GRAPH), external_data=GRAPH + "_data")
    _save_side_files(model, src, out)
