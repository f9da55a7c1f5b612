"""The input side of a fold: opening the base checkpoint (safetensors, or a pickle when
allowed) and checking that a delta fits it (names, shapes, finiteness, recorded hashes).

Used by ``fold``/``unfold`` and by ``verify_fold``, which checks the base before comparing.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lens_merge.errors import DeltaError, FoldError, ModelError
from lens_merge.weights._tensors import all_finite, crc32, crc32_entry, tensor_bytes
from lens_merge.weights.checkpoint import (
    PICKLE_INDEX,
    PICKLE_SINGLE,
    SAFE_INDEX,
    SAFE_SINGLE,
    Checkpoint,
    hash_entry,
    read_index,
    shard_entries,
)

if TYPE_CHECKING:
    from lens_merge.weights.delta import LensDelta


@dataclass
class Source:
    """The weights of a checkpoint directory: shard files and where each tensor lives.

    Attributes:
        root: the checkpoint directory.
        kind: ``safetensors`` or ``pickle``.
        shards: shard file names, in order.
        weight_map: tensor name -> shard file name.
        index_name: the index file's name (None for a single-file checkpoint).
        index_metadata: the index's ``metadata`` block.
    """

    root: Path
    kind: str
    shards: list[str]
    weight_map: dict[str, str]
    index_name: str | None
    index_metadata: dict


def open_source(root: Path, allow_pickle: bool) -> Source:
    """Open a checkpoint's weights.

    Raises:
        FoldError: a pickle checkpoint without ``allow_pickle``.
        ModelError: no checkpoint there.
    """
    try:
        ck = Checkpoint.open(root)
    except ModelError:
        has_pickle = (root / PICKLE_INDEX).is_file() or (root / PICKLE_SINGLE).is_file()
        if not has_pickle:
            raise
        if not allow_pickle:
            raise FoldError(f"{root}: holds a pickle (.bin) checkpoint, which can run code when "
                            "loaded; refused. Convert it to safetensors, or pass --allow-pickle "
                            "(allow_pickle=True) to load it with torch.load(weights_only=True) "
                            "and write safetensors.") from None
        return _open_pickle(root)
    return Source(root, "safetensors", [s.name for s in ck.shards], dict(ck.index),
                  SAFE_INDEX if ck.sharded else None, dict(ck.index_metadata))


def _open_pickle(root: Path) -> Source:
    idx = root / PICKLE_INDEX
    if idx.is_file():
        wm, shards, metadata = read_index(idx)
        return Source(root, "pickle", shards, wm, PICKLE_INDEX, metadata)
    state = load_pickle(root / PICKLE_SINGLE)
    return Source(root, "pickle", [PICKLE_SINGLE], {n: PICKLE_SINGLE for n in state}, None, {})


def load_pickle(path: Path) -> dict:
    """A pickle shard's state dict, loaded with ``torch.load(weights_only=True)``.

    Raises:
        ModelError: the load failed or did not give a dict.
    """
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is reported the same way
        raise ModelError(f"{path}: torch.load(weights_only=True) failed: {exc}") from exc
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def out_shard_name(src: Source, shard: str) -> str:
    """The output file name of a shard (pickle shards become safetensors)."""
    if src.kind == "safetensors":
        return shard
    if shard == PICKLE_SINGLE:
        return SAFE_SINGLE
    stem = shard[:-4] if shard.endswith(".bin") else shard
    return stem.replace("pytorch_model", "model", 1) + ".safetensors"


def check_inputs(src: Source, delta: LensDelta, expected: dict[str, str] | None,
                 pool: ThreadPoolExecutor | None = None, algo: str = "sha256") -> None:
    """Every delta tensor is finite and exists in the source with its shape and (if given)
    its hash.

    Args:
        src: the opened checkpoint.
        delta: the delta to fit.
        expected: tensor name -> recorded hash of its stored bytes (None: no hash check).
        pool: hash the stored tensors on these worker threads (hashing releases the GIL).
        algo: ``sha256`` (base hashes recorded in a delta) or ``crc32`` (fold records).

    Raises:
        FoldError: a delta tensor holds NaN or Inf.
        DeltaError: naming the tensor, and for a hash mismatch both hashes.
    """
    from lens_merge.weights.checkpoint import hash_tensor_bytes

    finite = {n: pool.submit(all_finite, d) if pool is not None else all_finite(d)
              for n, d in delta.tensors.items()}
    for name, ok in finite.items():
        if not (ok.result() if isinstance(ok, Future) else ok):
            raise FoldError(f"delta tensor {name} holds NaN or Inf; refusing to fold it")
    for name in delta.tensors:
        if name not in src.weight_map:
            raise DeltaError(f"delta changes tensor {name!r}, which {src.root} does not have "
                             "(a delta for another model, or tied embeddings?)")
    by_shard: dict[str, list[str]] = {}
    for name in delta.tensors:
        by_shard.setdefault(src.weight_map[name], []).append(name)
    jobs: list[tuple[str, str, Future | str]] = []
    for shard, names in by_shard.items():
        if src.kind == "safetensors":
            entries = shard_entries(src.root / shard)
            found = {n: (tuple(entries[n].shape), entries[n]) for n in names}
            hasher = hash_entry if algo == "sha256" else crc32_entry
        else:
            state = load_pickle(src.root / shard)
            found = {n: (tuple(state[n].shape), state[n]) for n in names}
            hasher = (hash_tensor_bytes if algo == "sha256"
                      else lambda t: crc32(tensor_bytes(t)))
        for n in names:
            if found[n][0] != tuple(delta.tensors[n].shape):
                raise DeltaError(f"tensor {n}: delta shape {tuple(delta.tensors[n].shape)} != "
                                 f"shape {found[n][0]} in {src.root / shard}")
        if expected is None:
            continue
        for n in names:
            obj = found[n][1]
            jobs.append((n, shard, pool.submit(hasher, obj) if pool is not None else hasher(obj)))
    for n, shard, job in jobs:
        got = job.result() if isinstance(job, Future) else job
        if got != expected[n]:
            raise DeltaError(f"tensor {n} in {src.root / shard}: {algo} {got} does not match "
                             f"the recorded {expected[n]}; this is not the checkpoint the delta "
                             "was made for")


def check_tied(root: Path, delta: LensDelta) -> None:
    """Refuse a delta on lm_head when the config ties it to the embeddings (it would be lost).

    Raises:
        FoldError: naming the tensor and the config.
    """
    names = [n for n in delta.tensors if n.endswith("lm_head.weight")]
    if not names:
        return
    from transformers import AutoConfig

    if getattr(AutoConfig.from_pretrained(str(root)), "tie_word_embeddings", False):
        raise FoldError(f"delta changes {names[0]}, but {root}/config.json ties it to the input "
                        "embeddings; the change would be dropped on load")


def resolve_base(base: str | Path) -> Path:
    """``default`` or a directory -> the checkpoint directory (see ``models.resolve_model``)."""
    from lens_merge.models import resolve_model

    return resolve_model(base)


def resolve_delta(delta: LensDelta | str | Path) -> LensDelta:
    """A ``LensDelta`` as given, or loaded from its directory."""
    from lens_merge.weights.delta import LensDelta

    return delta if isinstance(delta, LensDelta) else LensDelta.load(delta)
