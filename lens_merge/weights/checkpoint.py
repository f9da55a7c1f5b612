"""Streaming access to Hugging Face checkpoints on disk (one or many safetensors shards).

Nothing here loads a whole model: the safetensors header of each shard is parsed directly,
tensors are read one at a time, and tensor hashes are taken over the stored bytes.
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lens_merge.errors import ModelError, RecordError
from lens_merge.weights._safetensors import DTYPE_SIZES as DTYPE_SIZES  # re-exported
from lens_merge.weights._safetensors import MAX_HEADER as MAX_HEADER  # re-exported
from lens_merge.weights._safetensors import Error
from lens_merge.weights._safetensors import read_safetensors_header as read_safetensors_header

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"


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


def check_shard(path: str | Path, names: Iterator[str] | list[str] | None = None,
                error: Error = ModelError) -> dict[str, TensorEntry]:
    """Check one safetensors shard (header and size) before it is read, copied or linked.

    Args:
        path: the shard file.
        names: tensors an index says the shard holds (each must be in its header).
        error: the ``LensMergeError`` subclass to raise.

    Returns:
        The shard's tensors by name, in file order.

    Raises:
        ModelError (or ``error``): naming the file and the cause (``truncated: header
            promises N bytes, file has M``; a tensor the index names is missing).
    """
    entries = shard_entries(path, error)
    for n in names or ():
        if n not in entries:
            raise error(f"{path}: holds no tensor {n!r}, which the checkpoint's index places "
                        "in this shard")
    return entries


def shard_entries(path: str | Path, error: Error = ModelError) -> dict[str, TensorEntry]:
    """All tensors of one safetensors shard (header checked), by name, in file order."""
    path = Path(path)
    header, data_start = read_safetensors_header(path, error)
    items = [(k, v) for k, v in header.items() if k != "__metadata__"]
    items.sort(key=lambda kv: (kv[1]["data_offsets"][0], kv[1]["data_offsets"][1]))
    out: dict[str, TensorEntry] = {}
    for name, info in items:
        b, e = info["data_offsets"]
        out[name] = TensorEntry(name, path, info["dtype"], tuple(info["shape"]),
                                data_start + b, data_start + e)
    return out


def shard_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` block of a safetensors shard (empty dict when absent)."""
    header, _ = read_safetensors_header(Path(path))
    return dict(header.get("__metadata__") or {})


def _read_json(path: Path, error: Error) -> Any:
    from lens_merge.records import read_json

    try:
        return read_json(path)
    except RecordError as exc:
        raise error(str(exc)) from None


def check_shard_name(name: Any, where: str | Path, error: Error = ModelError) -> str:
    """A shard file name from an index: a plain name in the checkpoint's own directory.

    Raises:
        ModelError (or ``error``): for a non-string, an empty name, or one with ``..``,
            ``/``, ``\\`` or NUL (an absolute path or one that leaves the directory), or
            longer than a file name may be.
    """
    if not isinstance(name, str):
        raise error(f"{where}: shard name {name!r} is a {type(name).__name__}, expected a "
                    "file name")
    if (not name or ".." in name or any(c in name for c in "/\\\0")
            or len(name.encode("utf-8", "surrogatepass")) > 255):
        raise error(f"{where}: shard name {name!r} is not a plain file name in the checkpoint "
                    "directory (no '..', '/' or absolute paths)")
    return name


def read_index(idx: str | Path,
               error: Error = ModelError) -> tuple[dict[str, str], list[str], dict]:
    """Read and check a sharded checkpoint's index (safetensors or pickle).

    Returns:
        (tensor name -> shard file name, sorted shard file names, the index's metadata).

    Raises:
        ModelError (or ``error``): not UTF-8 JSON, not an object, no non-empty
            ``weight_map`` object of str -> str, a shard name that is not a plain file name,
            ``metadata`` not an object, or a named shard is missing.
    """
    idx = Path(idx)
    data = _read_json(idx, error)
    if not isinstance(data, dict):
        raise error(f"{idx}: a JSON {type(data).__name__}, expected an object with a "
                    "'weight_map'")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise error(f"{idx}: no 'weight_map' object (tensor name -> shard file), or it is "
                    "empty")
    for tensor, shard in weight_map.items():
        check_shard_name(shard, f"{idx}: weight_map[{tensor!r}]", error)
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise error(f"{idx}: 'metadata' is a {type(metadata).__name__}, expected an object")
    names = sorted(set(weight_map.values()))
    for n in names:
        if not (idx.parent / n).is_file():
            raise error(f"{idx}: names shard {n}, which is missing")
    return dict(weight_map), names, dict(metadata or {})


@dataclass
class Checkpoint:
    """A Hugging Face model directory whose weights are safetensors, one or many shards."""

    root: Path
    shards: list[Path]
    index: dict[str, str] = field(default_factory=dict)  # tensor name -> shard file name
    index_metadata: dict = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | Path, check: bool = True) -> Checkpoint:
        """Open a checkpoint directory.

        Args:
            root: the model directory.
            check: check every shard's header and size (``check_shard``) and that each
                holds the tensors the index places in it; cheap (headers only).

        Raises:
            ModelError: when the directory has no safetensors weights (pickle checkpoints
                are named so the caller can offer ``--allow-pickle``), or an index or shard
                is malformed or truncated (the file and the cause named).
        """
        root = Path(root)
        if not root.is_dir():
            raise ModelError(f"{root}: not a directory (expected a Hugging Face model directory)")
        idx = root / SAFE_INDEX
        if idx.is_file():
            weight_map, names, metadata = read_index(idx)
            ck = cls(root, [root / n for n in names], weight_map, metadata)
            if check:
                ck.check()
            return ck
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

    def check(self) -> None:
        """Check every shard (header, size) and that it holds what the index places in it.

        Raises:
            ModelError: naming the shard and the cause.
        """
        by_shard: dict[str, list[str]] = {}
        for tensor, shard in self.index.items():
            by_shard.setdefault(shard, []).append(tensor)
        for shard in self.shards:
            check_shard(shard, by_shard.get(shard.name, []))

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
        return check_shard(self.root / shard, [name])[name]

    def tensor_names(self) -> list[str]:
        return list(self.index)

    def config(self) -> dict:
        cfg = self.root / "config.json"
        if not cfg.is_file():
            raise ModelError(f"{self.root}: config.json missing")
        data = _read_json(cfg, ModelError)
        if not isinstance(data, dict):
            raise ModelError(f"{cfg}: a JSON {type(data).__name__}, expected an object")
        return data


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
