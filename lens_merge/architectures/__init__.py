"""Weight-name tables, one JSON file per architecture family, read by train, fold and export.

A table maps Hugging Face tensor names to what lens_merge needs to know about them: which
decoder block they belong to, the final norm, the embeddings, and their GGUF names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from lens_merge.errors import ModelError


@dataclass(frozen=True)
class Architecture:
    """One architecture family's weight-name table (see ``lens_merge/architectures/*.json``)."""

    name: str
    model_types: tuple[str, ...]
    hf_architectures: tuple[str, ...]
    block_prefix: str
    embed: str
    final_norm: str
    lm_head: str
    global_tensors: dict[str, str]
    block_tensors: dict[str, str]
    gguf: dict | None
    notes: str = ""
    input_scale: str | None = None  # "sqrt_hidden": the decoder scales inputs_embeds (Gemma)

    def block_of(self, tensor_name: str) -> int | None:
        """The decoder block index a tensor belongs to, or None for global tensors."""
        prefix = re.escape(self.block_prefix).replace(r"\{bid\}", r"(\d+)")
        m = re.match(prefix, tensor_name)
        return int(m.group(1)) if m else None

    def block_tensor_names(self, bid: int) -> list[str]:
        """HF names of every tensor of block ``bid`` this table knows."""
        pre = self.block_prefix.format(bid=bid)
        return [pre + suffix for suffix in self.block_tensors]

    def gguf_name(self, tensor_name: str) -> str | None:
        """GGUF name of an HF tensor (None when the table does not map it)."""
        if tensor_name in self.global_tensors:
            return self.global_tensors[tensor_name]
        bid = self.block_of(tensor_name)
        if bid is None:
            return None
        suffix = tensor_name[len(self.block_prefix.format(bid=bid)):]
        g = self.block_tensors.get(suffix)
        return f"blk.{bid}.{g}" if g else None


@cache
def _load_all() -> dict[str, Architecture]:
    out: dict[str, Architecture] = {}
    for entry in resources.files(__package__).iterdir():
        if not entry.name.endswith(".json"):
            continue
        d = json.loads(entry.read_text())
        out[d["name"]] = Architecture(
            name=d["name"],
            model_types=tuple(d["model_types"]),
            hf_architectures=tuple(d["hf_architectures"]),
            block_prefix=d["block_prefix"],
            embed=d["embed"],
            final_norm=d["final_norm"],
            lm_head=d["lm_head"],
            global_tensors=dict(d["global_tensors"]),
            block_tensors=dict(d["block_tensors"]),
            gguf=d.get("gguf"),
            notes=d.get("notes", ""),
            input_scale=d.get("input_scale"),
        )
    return out


def names() -> list[str]:
    """Names of every known architecture table."""
    return sorted(_load_all())


def get(name: str) -> Architecture:
    """The table called ``name``; the error lists the known names."""
    tables = _load_all()
    if name not in tables:
        raise ModelError(f"unknown architecture table {name!r}; known: {', '.join(sorted(tables))}")
    return tables[name]


def for_config(config: dict) -> Architecture:
    """The table for a model's ``config.json`` (matched on ``model_type``).

    Raises:
        ModelError: naming the model_type and the supported ones.
    """
    mt = config.get("model_type")
    for arch in _load_all().values():
        if mt in arch.model_types:
            return arch
    supported = sorted(t for a in _load_all().values() for t in a.model_types)
    raise ModelError(f"model_type {mt!r} is not supported; supported: {', '.join(supported)}")
