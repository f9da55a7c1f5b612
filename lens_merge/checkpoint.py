"""Streaming access to Hugging Face checkpoints on disk (one or many safetensors shards).

Nothing here loads a whole model: the safetensors header of each shard is parsed directly,
tensors are read one at a time, and tensor hashes are taken over the stored bytes.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lens_merge.errors import ModelError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"

# Bytes per element of each safetensors dtype string.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside a safetensors shard."""

    name: str
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the shard file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        (header dict, byte offset where the data section starts).
    """
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ModelError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ModelError(f"{path}: not a safetensors file (header length {n})")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: corrupt safetensors header ({exc})") from exc
    return header, 8 + n


def shard_entries(path: Path) -> dict[str, TensorEntry]:
    """All tensors of one safetensors shard, by name, in file order."""
    header, data_start = read_safetensors_header(path)
    out: dict[str, TensorEntry] = {}
    items = [(k, v) for k, v in header.items() if k != "__metadata__"]
    items.sort(key=lambda kv: kv[1]["data_offsets"][0])
    for name, info in items:
        b, e = info["data_offsets"]
        out[name] = TensorEntry(name, path, info["dtype"], tuple(info["shape"]),
                                data_start + b, data_start + e)
    return out


def shard_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` block of a safetensors shard (empty dict when absent)."""
    header, _ = read_safetensors_header(path)
    return dict(header.get("__metadata__") or {})


def read_index(idx: Path) -> tuple[dict[str, str], list[str], dict]:
    """Read a sharded checkpoint's index (safetensors or pickle).

    Returns:
        (tensor name -> shard file name, sorted shard file names, the index's metadata).

    Raises:
        ModelError: no ``weight_map`` object, or a shard it names is missing.
    """
    data = json.loads(idx.read_text())
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ModelError(f"{idx}: no 'weight_map' object")
    names = sorted(set(weight_map.values()))
    for n in names:
        if not (idx.parent / n).is_file():
            raise ModelError(f"{idx}: names shard {n}, which is missing")
    return dict(weight_map), names, dict(data.get("metadata") or {})


@dataclass
class Checkpoint:
    """A Hugging Face model directory whose weights are safetensors, one or many shards."""

    root: Path
    shards: list[Path]
    index: dict[str, str] = field(default_factory=dict)  # tensor name -> shard file name
    index_metadata: dict = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | Path) -> Checkpoint:
        """Open a checkpoint directory.

        Raises:
            ModelError: when the directory has no safetensors weights (pickle checkpoints
                are named so the caller can offer ``--allow-pickle``).
        """
        root = Path(root)
        if not root.is_dir():
            raise ModelError(f"{root}: not a directory (expected a Hugging Face model directory)")
        idx = root / SAFE_INDEX
        if idx.is_file():
            weight_map, names, metadata = read_index(idx)
            return cls(root, [root / n for n in names], weight_map, metadata)
        single = root / SAFE_SINGLE
        if single.is_file():
            entries = shard_entries(single)
            return cls(root, [single], {n: SAFE_SINGLE for n in entries})
        if (root / PICKLE_INDEX).is_file() or (root / PICKLE_SINGLE).is_file():
            raise ModelError(
                f"{root}: holds a pickle (.bin) checkpoint; pickle files can run code when "
                "loaded. Convert it to safetensors, or pass --allow-pickle to load it with "
                "torch.load(weights_only=True)."
            )
        raise ModelError(f"{root}: no {SAFE_SINGLE} or {SAFE_INDEX} found")

    @property
    def sharded(self) -> bool:
        return (self.root / SAFE_INDEX).is_file()

    def entries(self) -> Iterator[tuple[Path, dict[str, TensorEntry]]]:
        """Yield (shard path, its tensors) one shard at a time."""
        for shard in self.shards:
            yield shard, shard_entries(shard)

    def entry(self, name: str) -> TensorEntry:
        """Locate one tensor."""
        shard = self.index.get(name)
        if shard is None:
            raise ModelError(f"{self.root}: no tensor named {name!r}")
        return shard_entries(self.root / shard)[name]

    def tensor_names(self) -> list[str]:
        return list(self.index)

    def config(self) -> dict:
        cfg = self.root / "config.json"
        if not cfg.is_file():
            raise ModelError(f"{self.root}: config.json missing")
        return json.loads(cfg.read_text())


def hash_entry(entry: TensorEntry) -> str:
    """sha256 of a tensor's stored bytes (the dtype and layout as on disk)."""
    h = hashlib.sha256()
    with open(entry.shard, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        step = 1 << 24
        for off in range(entry.begin, entry.end, step):
            h.update(mm[off:min(off + step, entry.end)])
    return h.hexdigest()


def hash_tensor_bytes(t) -> str:
    """sha256 of an in-memory torch tensor's bytes, equal to ``hash_entry`` of the stored copy."""
    import torch

    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        raw = t.view(torch.int16).numpy().tobytes()
    else:
        raw = t.numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """sha256 of a whole file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()
