"""The write side of a fold/unfold: every shard into a temporary sibling of the output, the
index, the other files and ``lens_merge.json``, then one rename into place
(``lens_merge.files.atomic_dir``).

Shards without a changed tensor are copied byte for byte by the kernel (or hardlinked) on a
worker thread; a shard with changed tensors is rewritten tensor by tensor by ``ShardWriter``:
unchanged tensors' bytes are copied through, each changed tensor is computed as W +- dW.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_merge import __version__
from lens_merge.errors import FoldError, RecordError
from lens_merge.files import atomic_dir, write_json_atomic
from lens_merge.progress import Progress
from lens_merge.provenance import build_time, tool_info
from lens_merge.records import read_json
from lens_merge.weights._report import (
    FORMAT,
    FORMAT_VERSION,
    PROVENANCE_FILE,
    WEIGHT_SUFFIXES,
    FoldReport,
)
from lens_merge.weights._source import Source, load_pickle, out_shard_name
from lens_merge.weights._tensors import ST_DTYPES, apply, crc32, st_dtype, tensor_bytes
from lens_merge.weights.checkpoint import (
    PICKLE_INDEX,
    SAFE_INDEX,
    read_safetensors_header,
    shard_entries,
)
from lens_merge.weights.shard_writer import ShardWriter

if TYPE_CHECKING:
    from lens_merge.weights.delta import LensDelta

_META_PREFIX = "lens_merge_"
_SKIP_DIRS = (".git", ".cache")  # VCS and download caches do not travel


class OutputHashes:
    """Hashes each written tensor on a worker thread while the next one is computed.

    Always CRC-32 (recorded so an unfold can tell the folded tensors are intact); sha256 too
    when asked (an unfold compares it with the base hashes recorded in the delta). At most one
    hash is pending, so at most two tensors' bytes are alive at a time.
    """

    def __init__(self, pool: ThreadPoolExecutor, records: dict, sha256: bool) -> None:
        self._pool, self.records, self._sha256 = pool, records, sha256
        self._pending: tuple[str, Future] | None = None

    def submit(self, name: str, raw) -> None:
        self.flush()
        self._pending = (name, self._pool.submit(_out_hashes, raw, self._sha256))

    def flush(self) -> None:
        if self._pending is not None:
            name, fut = self._pending
            self._pending = None
            self.records[name].update(fut.result())


def _out_hashes(raw, sha256: bool) -> dict[str, str]:
    out = {"out_crc32": crc32(raw)}
    if sha256:
        out["out_sha256"] = hashlib.sha256(raw).hexdigest()
    return out


def _shard_meta(base_meta: dict, operation: str, fingerprint: str, n_changed: int) -> dict:
    meta = {k: str(v) for k, v in base_meta.items() if not k.startswith(_META_PREFIX)}
    meta.setdefault("format", "pt")
    meta.update({f"{_META_PREFIX}operation": operation,
                 f"{_META_PREFIX}version": __version__,
                 f"{_META_PREFIX}changed_tensors": str(n_changed),
                 f"{_META_PREFIX}delta_fingerprint": fingerprint})
    stamp = build_time()  # no wall-clock time unless SOURCE_DATE_EPOCH: reproducible shards
    if stamp:
        meta[f"{_META_PREFIX}time"] = stamp
    return meta


def _rewrite_safetensors(path: Path, dest: Path, delta: LensDelta, sign: float, meta: dict,
                         hashes: OutputHashes) -> None:
    import torch

    header, _ = read_safetensors_header(path)
    header = {k: v for k, v in header.items() if k != "__metadata__"}
    header["__metadata__"] = meta
    writer = ShardWriter(dest, header)
    try:
        with open(path, "rb") as fh:
            for name, e in shard_entries(path).items():
                d = delta.delta_for(name)
                if d is None:
                    writer.copy_from(name, fh, e.begin, e.nbytes)
                    continue
                if e.dtype not in ST_DTYPES:
                    raise FoldError(f"tensor {name} in {path}: dtype {e.dtype} is not a float "
                                    "type; a delta can only change float tensors")
                fh.seek(e.begin)
                buf = bytearray(fh.read(e.nbytes))
                w = torch.frombuffer(buf, dtype=getattr(torch, ST_DTYPES[e.dtype]))
                out, err = apply(w.reshape(e.shape), d, sign, name)
                raw = tensor_bytes(out)
                hashes.records[name] = {"shard": dest.name, "dtype": e.dtype,
                                        "max_cast_error": err}
                writer.write(name, raw)
                hashes.submit(name, raw)
                del buf, w, out, raw
        writer.close()
        hashes.flush()
    finally:
        writer.abort()


def _convert_pickle(path: Path, dest: Path, delta: LensDelta, sign: float, meta: dict,
                    hashes: OutputHashes) -> list[str]:
    state = load_pickle(path)
    header: dict[str, Any] = {}
    off = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": st_dtype(t), "shape": list(t.shape),
                        "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = meta
    writer = ShardWriter(dest, header)
    try:
        for name, t in state.items():
            d = delta.delta_for(name)
            if d is not None:
                t, err = apply(t, d, sign, name)
                raw = tensor_bytes(t)
                hashes.records[name] = {"shard": dest.name, "dtype": header[name]["dtype"],
                                        "max_cast_error": err}
                writer.write(name, raw)
                hashes.submit(name, raw)
            else:
                writer.write(name, tensor_bytes(t))
        writer.close()
        hashes.flush()
    finally:
        writer.abort()
    return list(state)


def _place_shard(src: Path, dest: Path, link: bool) -> bool:
    """Hardlink (when asked and possible) or copy a shard byte for byte; True when linked."""
    if link:
        try:
            os.link(src.resolve(), dest)
            return True
        except OSError:
            pass
    shutil.copyfile(src, dest)
    return False


def _copy_other_files(src: Source, tmp: Path) -> list[str]:
    """Copy every non-weight file (config, tokenizer, templates, ...); return skipped files."""
    own = set(src.shards) | {SAFE_INDEX, PICKLE_INDEX, PROVENANCE_FILE}
    skipped = []
    for dirpath, dirnames, filenames in os.walk(src.root):
        rel_dir = Path(dirpath).relative_to(src.root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for fn in filenames:
            rel = rel_dir / fn
            if rel_dir == Path(".") and fn in own:
                continue
            if fn.endswith(WEIGHT_SUFFIXES):
                skipped.append(str(rel))
                continue
            (tmp / rel_dir).mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(dirpath) / fn, tmp / rel)
    return sorted(skipped)


def _write_shards(operation: str, src: Source, delta: LensDelta, tmp: Path, fingerprint: str,
                  hashes: OutputHashes, link: bool, progress: Progress, rep: FoldReport
                  ) -> dict[str, str]:
    """Write every shard into ``tmp``; fill the report's shard lists; return the weight map.

    Unchanged shards are copied (or linked) on a worker thread, where the kernel copies them,
    while the shards with changed tensors are rewritten on this one.
    """
    sign = 1.0 if operation == "fold" else -1.0
    changed: dict[str, int] = {}
    for name in delta.tensors:
        changed[src.weight_map[name]] = changed.get(src.weight_map[name], 0) + 1
    weight_map = dict(src.weight_map) if src.kind == "safetensors" else {}
    placed: dict[str, Future] = {}
    copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lens-merge-copy")
    try:
        with progress.task(f"{operation} shards", len(src.shards)) as task:
            for shard in src.shards:
                path, dest_name = src.root / shard, out_shard_name(src, shard)
                n = changed.get(shard, 0)
                if src.kind == "safetensors" and not n:
                    placed[dest_name] = copier.submit(_place_shard, path, tmp / dest_name, link)
                    continue
                if src.kind == "pickle":
                    meta = _shard_meta({"format": "pt"}, operation, fingerprint, n)
                    names = _convert_pickle(path, tmp / dest_name, delta, sign, meta, hashes)
                    weight_map.update({k: dest_name for k in names})
                else:
                    hdr, _ = read_safetensors_header(path)
                    meta = _shard_meta(dict(hdr.get("__metadata__") or {}), operation,
                                       fingerprint, n)
                    _rewrite_safetensors(path, tmp / dest_name, delta, sign, meta, hashes)
                rep.rewritten.append(dest_name)
                task.advance()
            for dest_name, job in placed.items():
                (rep.linked if job.result() else rep.copied).append(dest_name)
                task.advance()
    finally:
        copier.shutdown(wait=True, cancel_futures=True)
    return weight_map


def write_output(rep: FoldReport, base_dir: Path, src: Source, delta: LensDelta,
                 fingerprint: str, hashes: OutputHashes, link: bool, progress: Progress,
                 provenance: dict, t0: float) -> dict[str, dict]:
    """Write ``rep.out`` atomically (a temporary sibling renamed into place; an existing
    output, already allowed by the caller, is replaced only once the new one is complete).

    Args:
        rep: the report to fill (operation, out, base and the check fields already set).
        base_dir: the checkpoint read (its ``lens_merge.json`` is kept as ``previous``).
        src: its opened weights.
        delta: the delta to add (fold) or subtract (unfold).
        fingerprint: ``delta_fingerprint(delta)``.
        hashes: hashes the changed tensors as they are written; its records are returned.
        link: hardlink unchanged shards when possible.
        progress: one tick per shard.
        provenance: extra top-level keys of ``lens_merge.json``.
        t0: ``time.perf_counter()`` at the start (for ``rep.seconds``).

    Returns:
        Per changed tensor: shard, dtype, max_cast_error, out_crc32 (and out_sha256).
    """
    records = hashes.records
    with atomic_dir(rep.out, overwrite=True) as tmp:
        weight_map = _write_shards(rep.operation, src, delta, tmp, fingerprint, hashes, link,
                                   progress, rep)
        if src.index_name is not None or len(src.shards) > 1:
            total = sum(e.nbytes for s in sorted(set(weight_map.values()))
                        for e in shard_entries(tmp / s).values())
            write_json_atomic(tmp / SAFE_INDEX, {
                "metadata": {**{k: v for k, v in src.index_metadata.items()
                                if k != "total_size"}, "total_size": total},
                "weight_map": dict(sorted(weight_map.items()))})
        rep.skipped_files = _copy_other_files(src, tmp)
        if records:
            worst = max(records, key=lambda k: records[k]["max_cast_error"])
            rep.max_cast_error = float(records[worst]["max_cast_error"])
            rep.max_cast_error_tensor = worst if rep.max_cast_error > 0 else None
        rep.seconds = time.perf_counter() - t0
        op = rep.operation
        prov = {"format": FORMAT, "format_version": FORMAT_VERSION, "operation": op,
                "tool": tool_info(), **provenance,
                "delta": delta.meta, "delta_fingerprint": fingerprint, "tensors": records,
                "report": {k: v for k, v in rep.to_dict().items()
                           if k != "out" and not k.endswith("seconds")}}
        if build_time():
            prov[f"{op}ed_at"] = build_time()
        previous = base_dir / PROVENANCE_FILE
        if previous.is_file():
            try:
                prov["previous"] = read_json(previous)
            except RecordError:
                prov["previous"] = {"unreadable": str(previous)}
        write_json_atomic(tmp / PROVENANCE_FILE, prov)
    rep.seconds = time.perf_counter() - t0
    return records
