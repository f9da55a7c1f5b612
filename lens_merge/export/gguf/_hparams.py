"""Hyperparameter keys (``<arch>.*``) and generated tensors, per architecture.

Supported: llama (Llama 1-3.x incl. ``rope_type: llama3``, SmolLM2, Mistral), qwen2, qwen3,
phi3 (Phi-3/3.5 incl. longrope). RoPE scaling: linear and yarn become keys, llama3 becomes
the ``rope_freqs.weight`` tensor, longrope becomes ``rope_factors_long/short.weight`` plus an
attention factor key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lens_merge.errors import ExportError

SUPPORTED = ("llama", "qwen2", "qwen3", "phi3")


@dataclass(frozen=True)
class Dims:
    """The shape facts every writer step needs."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dim: int
    n_vocab: int


def dims(cfg: dict) -> Dims:
    """Read the model dimensions from ``config.json``.

    Raises:
        ExportError: naming the first missing field.
    """
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size",
                "intermediate_size"):
        if key not in cfg:
            raise ExportError(f"config.json: field {key!r} missing")
    n_head = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
    rot = float(cfg.get("partial_rotary_factor", 1.0))
    rope_dim = int(rot * head_dim)
    return Dims(n_layer=int(cfg["num_hidden_layers"]), n_embd=int(cfg["hidden_size"]),
                n_head=n_head, n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
                head_dim=head_dim, rope_dim=rope_dim, n_vocab=int(cfg["vocab_size"]))


def _rope_scaling(cfg: dict) -> dict | None:
    rs = cfg.get("rope_scaling")
    if not rs:
        return None
    rs = dict(rs)
    rs["rope_type"] = str(rs.get("rope_type") or rs.get("type") or "").lower()
    return rs


def write_hparams(w, arch: str, cfg: dict) -> None:
    """Add the ``<arch>.*`` hyperparameter keys to a ``gguf.GGUFWriter``.

    Raises:
        ExportError: for a RoPE scaling type the architecture cannot express in GGUF.
    """
    import gguf

    d = dims(cfg)
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(d.n_embd)
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_block_count(d.n_layer)
    w.add_head_count(d.n_head)
    w.add_head_count_kv(d.n_head_kv)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_rope_dimension_count(d.rope_dim)
    w.add_vocab_size(d.n_vocab)
    if cfg.get("head_dim"):
        w.add_key_length(d.head_dim)
        w.add_value_length(d.head_dim)
    rs = _rope_scaling(cfg)
    kind = rs["rope_type"] if rs else None
    if arch == "phi3":
        orig = int(cfg.get("original_max_position_embeddings")
                   or cfg.get("max_position_embeddings", 4096))
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_sliding_window(int(cfg.get("sliding_window") or 0))
        if kind in ("longrope", "su"):
            scale = cfg["max_position_embeddings"] / orig
            attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
            w.add_rope_scaling_attn_factors(attn)
            return
    if kind in (None, "default"):
        return
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
    elif kind == "llama3" and arch == "llama":
        pass  # expressed by the rope_freqs tensor (extra_tensors)
    else:
        raise ExportError(f"config.json: rope_scaling type {kind!r} is not supported for "
                          f"{arch} GGUF export (supported: linear, yarn"
                          f"{', llama3' if arch == 'llama' else ''}"
                          f"{', longrope' if arch == 'phi3' else ''})")


def llama3_rope_factors(cfg: dict) -> np.ndarray:
    """Per-frequency divisors llama.cpp applies for Llama-3.1 RoPE (``rope_freqs.weight``).

    For each inverse frequency f = base^(-2i/dim): 1 where the wavelength is shorter than
    original_ctx / high_freq_factor, ``factor`` where it is longer than
    original_ctx / low_freq_factor, and a smooth interpolation in between.
    """
    rs = _rope_scaling(cfg) or {}
    d = dims(cfg)
    base = float(cfg.get("rope_theta", 10000.0))
    factor = float(rs.get("factor", 8.0))
    low = float(rs.get("low_freq_factor", 1.0))
    high = float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / (base ** (np.arange(0, d.rope_dim, 2, dtype=np.float64) / d.rope_dim))
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))
    return out.astype(np.float32)


def _tensor_name(tensor: str) -> str:
    """GGUF name of a global tensor, from gguf-py's table (``rope_freqs.weight``)."""
    import gguf

    return f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[tensor]]}.weight"


def extra_tensors(arch: str, cfg: dict) -> list[tuple[str, np.ndarray]]:
    """Tensors GGUF needs that the checkpoint does not store (RoPE factor tables).

    Raises:
        ExportError: when longrope factor lists have the wrong length.
    """
    rs = _rope_scaling(cfg)
    kind = rs["rope_type"] if rs else None
    if arch == "llama" and kind == "llama3":
        return [(_tensor_name("ROPE_FREQS"), llama3_rope_factors(cfg))]
    if arch == "phi3" and kind in ("longrope", "su"):
        d = dims(cfg)
        long_f, short_f = rs.get("long_factor"), rs.get("short_factor")
        if not long_f or not short_f or len(long_f) != len(short_f) or \
                len(long_f) != d.rope_dim // 2:
            raise ExportError(f"config.json: rope_scaling long_factor/short_factor must both "
                              f"have {d.rope_dim // 2} entries")
        return [(_tensor_name("ROPE_FACTORS_LONG"), np.asarray(long_f, dtype=np.float32)),
                (_tensor_name("ROPE_FACTORS_SHORT"), np.asarray(short_f, dtype=np.float32))]
    return []
