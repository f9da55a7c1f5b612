"""Model shapes for the memory plan: parameter counts from ``config.json`` alone.

No weights are read. A shape comes from a model directory's ``config.json`` (the stored dtype
is then taken from the first 2-D tensor's safetensors header, which is what the stages load),
from any ``config.json`` path, or from a shipped shape by name (``llama3-8b``, ``llama3-70b``:
``lens_merge/data/shapes/*.json``, the published configs), so a recipe can be planned before
its base is downloaded.

Parameter counts (exact for the supported families; ``tests/unit/test_plan.py`` checks them
against transformers' own modules built on the meta device):

- block: ``d*(H*hd) + 2*d*(Hkv*hd) + (H*hd)*d`` (q, k, v, o) ``+ 3*d*f`` (gate, up, down)
  ``+ n_norms*d`` (2 norms; Gemma-2 has 4) ``+ (H + 2*Hkv)*hd`` q/k/v biases (Qwen2, or
  ``attention_bias``) ``+ 2*hd`` q/k norms (Qwen3) ``+ d`` o bias (``attention_bias``);
- embeddings ``V*d``; output head ``V*d`` unless tied; final norm ``d``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from lens_merge.errors import ModelError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "F32": 4, "BF16": 2, "F16": 2,
               "fp32": 4, "bf16": 2, "fp16": 2}
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "vocab_size")


def shipped_shapes() -> list[str]:
    """Names of the shapes shipped in ``lens_merge/data/shapes`` (``llama3-8b``, ...)."""
    root = resources.files("lens_merge.data") / "shapes"
    return sorted(e.name[:-5] for e in root.iterdir() if e.name.endswith(".json"))


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a model.

    Attributes:
        name: where the shape came from (a path or a shipped name).
        model_type: ``config.json``'s ``model_type``.
        d, f, n_layers, n_heads, n_kv, head_dim, vocab: hidden, intermediate, blocks, query
            heads, key/value heads, head dimension, vocabulary.
        tied: the output head is the embedding matrix.
        dtype: stored dtype (``float32``, ``bfloat16``, ``float16``).
        block_params: parameters of one decoder block.
        largest_shard: bytes of the largest weight file when known (model directory), else 0.
    """

    name: str
    model_type: str
    d: int
    f: int
    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    vocab: int
    tied: bool
    dtype: str
    block_params: int
    largest_shard: int = 0

    @property
    def dtype_bytes(self) -> int:
        """Bytes per stored weight."""
        return DTYPE_BYTES[self.dtype]

    @property
    def embed_params(self) -> int:
        """The embedding matrix, ``V*d``."""
        return self.vocab * self.d

    @property
    def params(self) -> int:
        """Every parameter: embeddings, blocks, final norm, and the head unless tied."""
        head = 0 if self.tied else self.embed_params
        return self.embed_params + head + self.n_layers * self.block_params + self.d

    @property
    def largest_block_tensor(self) -> int:
        """Elements of the largest block tensor (an MLP matrix or a projection)."""
        return max(self.d * self.f, self.d * self.n_heads * self.head_dim)

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest tensor (usually the embeddings)."""
        return max(self.embed_params, self.largest_block_tensor)


def block_params(cfg: dict[str, Any]) -> int:
    """Parameters of one decoder block from a ``config.json`` dict (formula: module doc)."""
    d, f = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    h = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or h)
    hd = int(cfg.get("head_dim") or d // h)
    mt = cfg.get("model_type")
    n = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
    n += (4 if mt in ("gemma2", "gemma3_text") else 2) * d
    if mt == "qwen2" or cfg.get("attention_bias"):
        n += (h + 2 * kv) * hd
    if cfg.get("attention_bias") and mt != "qwen2":
        n += d  # o_proj bias
    if mt == "qwen3":
        n += 2 * hd
    if cfg.get("mlp_bias"):
        n += 2 * f + d
    return n


def shape_from_config(cfg: dict[str, Any], name: str, dtype: str | None = None,
                      largest_shard: int = 0) -> ModelShape:
    """A ``ModelShape`` from a ``config.json`` dict.

    Args:
        cfg: the parsed config.
        name: how the plan names its source.
        dtype: the stored dtype when known from the weights (else the config's
            ``torch_dtype``/``dtype``, else float32, transformers' default).
        largest_shard: bytes of the largest weight file, when known.

    Raises:
        ModelError: a required key is missing or the dtype is unknown.
    """
    missing = [k for k in _REQUIRED if not isinstance(cfg.get(k), int)]
    if missing:
        raise ModelError(f"{name}: config.json lacks integer {', '.join(missing)} (needed for "
                         "the memory plan)")
    h = int(cfg["num_attention_heads"])
    dt = dtype or cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    if dt not in DTYPE_BYTES:
        raise ModelError(f"{name}: dtype {dt!r} unknown; expected float32, bfloat16 or float16")
    return ModelShape(
        name=name, model_type=str(cfg.get("model_type")), d=int(cfg["hidden_size"]),
        f=int(cfg["intermediate_size"]), n_layers=int(cfg["num_hidden_layers"]), n_heads=h,
        n_kv=int(cfg.get("num_key_value_heads") or h),
        head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // h),
        vocab=int(cfg["vocab_size"]), tied=bool(cfg.get("tie_word_embeddings", False)),
        dtype={"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(dt, dt),
        block_params=block_params(cfg), largest_shard=largest_shard)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot be read as a config.json ({exc})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return cfg


def _stored(model_dir: Path) -> tuple[str | None, int]:
    """Dtype of the first 2-D tensor and the largest weight file of a model directory."""
    from lens_merge.weights.checkpoint import Checkpoint

    try:
        ck = Checkpoint.open(model_dir, check=False)
    except ModelError:
        return None, 0
    largest = max((s.stat().st_size for s in ck.shards), default=0)
    for _, entries in ck.entries():
        for e in entries.values():
            if len(e.shape) == 2:
                return e.dtype, largest
    return None, largest


def load_shape(ref: str | Path) -> ModelShape:
    """The shape of a model directory, a ``config.json`` file or a shipped shape name.

    Args:
        ref: ``llama3-8b`` (see ``shipped_shapes()``), a path to a ``config.json``, or a
            Hugging Face model directory (its stored dtype is read from the weights' headers).

    Raises:
        ModelError: naming the reference and the shipped names.
    """
    s = str(ref)
    if s in shipped_shapes():
        text = (resources.files("lens_merge.data") / "shapes" / f"{s}.json").read_text()
        return shape_from_config(json.loads(text), s)
    p = Path(s).expanduser()
    if p.is_dir():
        dtype, largest = _stored(p)
        return shape_from_config(_read_config(p / "config.json"), str(p), dtype, largest)
    if p.is_file():
        return shape_from_config(_read_config(p), str(p))
    raise ModelError(f"model shape {s!r}: not a shipped shape ({', '.join(shipped_shapes())}), "
                     "a config.json file or a model directory")
