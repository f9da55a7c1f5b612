"""Checkpoint tensors -> GGUF tensors: names, types, conversion.

GGUF tensor names come from gguf-py's own table (``gguf.get_tensor_name_map``: its
``TensorNameMap`` restricted to ``MODEL_TENSORS[arch]``), never from a copy. Our architecture
table (``lens_merge/architectures/*.json``) supplies only what gguf-py lacks: which HF tensors
a model must have (the required GGUF tensors follow from them), the GGUF architecture of a
``model_type``, and whether q/k need llama.cpp's RoPE permutation (a converter decision, not a
gguf-py table).

Planning reads only safetensors headers; conversion loads one tensor at a time, so exporting
holds at most one tensor (in fp32 plus its encoded copy) in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lens_merge.architectures import Architecture
from lens_merge.errors import ExportError
from lens_merge.export.gguf._hparams import dims, extra_tensors
from lens_merge.export.gguf._types import OutType
from lens_merge.weights.checkpoint import Checkpoint, TensorEntry, shard_entries

# Checkpoint entries that are buffers, not weights (never written).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass
class TensorPlan:
    """One GGUF tensor: its name, where it comes from, its shape and its stored type."""

    name: str
    shape: tuple[int, ...]
    qtype: str  # GGMLQuantizationType member name
    source: str | None = None  # HF tensor name; None for generated tensors
    shard: Path | None = None
    permute_heads: int | None = None  # Llama q/k: heads for the RoPE layout permutation
    data: np.ndarray | None = None  # generated tensors (RoPE factor tables)
    fallback: str | None = None  # why the requested type was not used (block size, head)

    @property
    def nbytes(self) -> int:
        from gguf import GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        q = GGMLQuantizationType[self.qtype]
        if q == GGMLQuantizationType.F32:
            return 4 * math.prod(self.shape)
        if q == GGMLQuantizationType.F16:
            return 2 * math.prod(self.shape)
        return math.prod(quant_shape_to_byte_shape(self.shape, q))


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half q/k rows -> llama.cpp's interleaved RoPE layout (per head: halves
    interleaved)."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


# 4/5-bit types keep the output head at 8 bits: every logit goes through it (llama.cpp's own
# quantizer keeps it at Q6_K for these mixes; Q6_K has no Python quantizer).
LOW_BIT = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")
HEAD_TYPE = "Q8_0"


def _choose_type(shape: tuple[int, ...], name: str, outtype: OutType, head: bool = False
                 ) -> tuple[str, str | None]:
    """Stored type of one tensor, and the reason when it differs from the request.

    Args:
        head: the tensor is the output head (``output.weight``, or ``token_embd.weight``
            when the embeddings are tied).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) <= 1 or name.endswith("_norm.weight") or outtype.ggml == "F32":
        return "F32", None
    want = outtype.ggml
    assert want is not None, "K-quants are planned through their intermediate type"
    why = None
    if head and want in LOW_BIT:
        want, why = HEAD_TYPE, (f"output head kept at {HEAD_TYPE} (every logit goes through "
                                "it)")
    block = GGML_QUANT_SIZES[GGMLQuantizationType[want]][0]
    if shape[-1] % block:
        return "F16", f"row length {shape[-1]} is not a multiple of the {want} block size {block}"
    return want, why


def gguf_name_map(gguf_arch: str, n_layer: int):
    """gguf-py's HF -> GGUF tensor-name map for one GGUF architecture (``llama``, ``qwen2``).

    Use ``gguf_tensor_name(tmap, hf_name)`` to look a name up.

    Raises:
        ExportError: when the installed gguf package does not know the architecture.
    """
    import gguf

    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == gguf_arch), None)
    if arch is None:
        raise ExportError(f"the installed gguf package does not know the GGUF architecture "
                          f"{gguf_arch!r}; upgrade it (pip install -U gguf)")
    return gguf.get_tensor_name_map(arch, n_layer)


def gguf_tensor_name(tmap, hf_name: str) -> str | None:
    """The GGUF name of an HF tensor (``blk.3.attn_q.weight``), or None when gguf-py has no
    mapping for it in this architecture."""
    return tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def plan_tensors(ck: Checkpoint, arch: Architecture, cfg: dict, outtype: OutType
                 ) -> list[TensorPlan]:
    """Every tensor the GGUF will hold, in write order, without reading any weights.

    Raises:
        ExportError: for a checkpoint tensor gguf-py's name map does not map, a missing
            ``lm_head`` on an untied model, or a missing expected tensor.
    """
    g = arch.gguf or {}
    d = dims(cfg)
    tmap = gguf_name_map(g["arch"], d.n_layer)
    tied = bool(cfg.get("tie_word_embeddings", False))
    heads = {"attn_q": d.n_head, "attn_k": d.n_head_kv}  # weights and biases alike
    plans: list[TensorPlan] = []
    unmapped: list[str] = []
    for name, data in extra_tensors(g["arch"], cfg):
        plans.append(TensorPlan(name, tuple(data.shape), "F32", data=data))
    for shard, entries in ck.entries():
        for hf_name, e in entries.items():
            if hf_name.endswith(IGNORED_SUFFIXES):
                continue
            if hf_name == arch.lm_head and tied:
                continue  # tied embeddings: llama.cpp reuses token_embd, no output.weight
            gname = gguf_tensor_name(tmap, hf_name)
            if gname is None:
                unmapped.append(hf_name)
                continue
            head = gname == "output.weight" or (tied and gname == "token_embd.weight")
            qtype, why = _choose_type(e.shape, gname, outtype, head)
            permute = heads.get(gname.split(".")[-2]) if g.get("permute_qk") else None
            plans.append(TensorPlan(gname, tuple(e.shape), qtype, source=hf_name,
                                    shard=shard, permute_heads=permute, fallback=why))
    if unmapped:
        raise ExportError(f"{ck.root}: {len(unmapped)} tensor(s) have no GGUF name in gguf-py's "
                          f"tensor-name map for {g['arch']}, e.g. {', '.join(unmapped[:5])}")
    names = {p.name for p in plans}
    needed = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    block = [(hf, gguf_tensor_name(tmap, hf)) for b in range(d.n_layer)
             for hf in arch.block_tensor_names(b)]
    unnamed = [hf for hf, n in block if n is None]
    if unnamed:
        raise ExportError(f"lens_merge/architectures/{arch.name}.json lists tensor(s) gguf-py "
                          f"cannot name for {g['arch']}: {', '.join(unnamed[:5])}")
    needed += [n for _, n in block if n.endswith(".weight")]
    missing = [n for n in needed if n not in names]
    if missing:
        raise ExportError(f"{ck.root}: tensors missing for GGUF export: "
                          f"{', '.join(missing[:5])}" + (" (config.json says "
                          "tie_word_embeddings is false)" if "output.weight" in missing else ""))
    return plans


_NP_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}


def read_entry(entry: TensorEntry) -> np.ndarray:
    """One stored tensor as fp32 numpy, read with plain file I/O (no mmap, so the process
    holds only this tensor; bf16 is widened bit-exactly)."""
    with open(entry.shard, "rb") as fh:
        fh.seek(entry.begin)
        raw = fh.read(entry.nbytes)
    if len(raw) != entry.nbytes:
        raise ExportError(f"{entry.shard}: tensor {entry.name} is truncated")
    if entry.dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(entry.shape)
    if entry.dtype not in _NP_DTYPES:
        raise ExportError(f"{entry.shard}: tensor {entry.name} has dtype {entry.dtype}; GGUF "
                          "export reads F32, F16, BF16 and F64")
    return np.frombuffer(raw, dtype=_NP_DTYPES[entry.dtype]).astype(np.float32).reshape(
        entry.shape)


class TensorSource:
    """Loads planned tensors one at a time."""

    def __init__(self) -> None:
        self._shard: Path | None = None
        self._entries: dict[str, TensorEntry] = {}

    def load(self, plan: TensorPlan) -> np.ndarray:
        """The tensor as fp32 numpy, permuted for llama.cpp when the plan says so."""
        if plan.data is not None:
            return plan.data.astype(np.float32)
        if plan.shard != self._shard:
            self._entries = shard_entries(plan.shard)
            self._shard = plan.shard
        t = read_entry(self._entries[plan.source])
        if not np.isfinite(t).all():
            raise ExportError(f"{plan.shard}: tensor {plan.source} holds NaN or Inf")
        if plan.permute_heads:
            t = permute_rope(t, plan.permute_heads)
        return np.ascontiguousarray(t)

    def close(self) -> None:
        self._entries = {}
        self._shard = None


def encode(plan: TensorPlan, data: np.ndarray) -> np.ndarray:
    """Convert an fp32 tensor to its stored GGUF type (bytes for quantized types)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    out = quantize(data, GGMLQuantizationType[plan.qtype])
    if out.nbytes != plan.nbytes:
        raise ExportError(f"tensor {plan.name}: encoded to {out.nbytes} bytes, planned "
                          f"{plan.nbytes}")
    return out


def iter_encoded(plans: list[TensorPlan]) -> Iterator[tuple[TensorPlan, np.ndarray]]:
    """Yield (plan, encoded array) in plan order, one tensor in memory at a time."""
    src = TensorSource()
    try:
        for p in plans:
            yield p, encode(p, src.load(p))
    finally:
        src.close()
