"""Fold a Lens delta into a standalone Hugging Face checkpoint, unfold it, and verify the fold.

``fold`` first checks every base tensor the delta changes against the sha256 recorded in the
delta, then streams the checkpoint. Shards without a changed tensor are copied byte for byte by
the kernel (or hardlinked) on a worker thread; a shard with changed tensors is rewritten tensor
by tensor: the unchanged tensors' bytes are copied through, each changed tensor is computed as
W + dW in fp32 and cast back to its stored dtype. Beyond the delta, at most two tensors are in
memory at a time (a whole shard for the ``--allow-pickle`` path, where torch.load reads a shard
at once). Everything is written into a temporary sibling of the output, renamed into place at
the end. Provenance: ``lens_merge.json`` and metadata in each rewritten shard; the folded
tensors are recorded with a CRC-32 (eight times cheaper than sha256 here), enough for
``unfold`` to notice a modified checkpoint.

``unfold`` is the same walk with W - dW. ``verify_fold`` compares the logits of the base with
the delta applied in memory against the folded checkpoint reloaded with plain transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_merge import __version__
from lens_merge._shard_writer import COPY_CHUNK, ShardWriter
from lens_merge.checkpoint import (
    PICKLE_INDEX,
    PICKLE_SINGLE,
    SAFE_INDEX,
    SAFE_SINGLE,
    Checkpoint,
    TensorEntry,
    hash_entry,
    read_index,
    read_safetensors_header,
    shard_entries,
)
from lens_merge.errors import DeltaError, FoldError, ModelError
from lens_merge.progress import NULL, Progress
from lens_merge.provenance import now_iso, ordinary_permissions, tool_info, write_json_atomic

if TYPE_CHECKING:
    import torch

    from lens_merge.delta import LensDelta

PROVENANCE_FILE = "lens_merge.json"
FORMAT = "lens-merge-fold"
FORMAT_VERSION = 1
# Files of these kinds outside the checkpoint's own shards would carry stale (unfolded) weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                   ".onnx", ".onnx_data", ".npz")
# Default verification tolerance (max |logit difference|) by the dtype the models run in.
TOLERANCES = {"float32": 1e-4, "float64": 1e-6, "float16": 1e-2, "bfloat16": 5e-2}
_META_PREFIX = "lens_merge_"
_SKIP_DIRS = (".git", ".cache")  # VCS and download caches do not travel


@dataclass
class FoldReport:
    """What a fold or unfold wrote.

    Attributes:
        operation: ``fold`` or ``unfold``.
        out: the output directory.
        base: the checkpoint read (``default`` or a path).
        rewritten: shard files rewritten (changed tensors, or converted from pickle).
        copied: shard files copied byte for byte.
        linked: shard files hardlinked (``link=True`` on the same filesystem).
        changed_tensors: number of tensors the delta changed.
        max_cast_error: largest |cast(W +- dW) - (W +- dW)| over changed tensors (0 in fp32).
        max_cast_error_tensor: the tensor where it occurred.
        seconds: wall time.
        check_seconds: of which checking the inputs (hashes, shapes, finiteness) took.
        source_format: ``safetensors`` or ``pickle`` (then the output was converted to
            safetensors).
        skipped_files: weight-like files outside the checkpoint's shards, not copied.
        hashes_checked: whether the input tensors were checked against recorded sha256s.
        restored_exact: (unfold) tensors whose recovered bytes equal the recorded base hash.
    """

    operation: str
    out: Path
    base: str
    rewritten: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    linked: list[str] = field(default_factory=list)
    changed_tensors: int = 0
    max_cast_error: float = 0.0
    max_cast_error_tensor: str | None = None
    seconds: float = 0.0
    check_seconds: float = 0.0
    source_format: str = "safetensors"
    skipped_files: list[str] = field(default_factory=list)
    hashes_checked: bool = True
    restored_exact: list[str] | None = None

    @property
    def converted_from_pickle(self) -> bool:
        return self.source_format == "pickle"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


# --------------------------------------------------------------------------- tensors

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _st_dtype(t: torch.Tensor) -> str:
    import torch

    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
             torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
             torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
    if t.dtype not in names:
        raise FoldError(f"tensor dtype {t.dtype} cannot be written to safetensors by lens-merge")
    return names[t.dtype]


def _tensor_bytes(t: torch.Tensor):
    """The little-endian bytes of a tensor (a numpy view; no copy when contiguous)."""
    import torch

    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy()


def _apply(w: torch.Tensor, d: torch.Tensor, sign: float, name: str) -> tuple[torch.Tensor, float]:
    """cast(W + sign*dW) computed in fp32 (fp64 for fp64 tensors); returns it and the cast error.

    Exactly the arithmetic of ``lens_merge.delta.apply_delta``, so a fold reproduces the
    in-memory application bit for bit. ``w`` is consumed: when it is already in the compute
    dtype the sum is taken in place, to hold one copy of the tensor instead of two.
    """
    import torch

    if not w.is_floating_point():
        raise FoldError(f"tensor {name}: dtype {w.dtype} is not floating point; a delta can "
                        "only change float tensors")
    compute = torch.float64 if w.dtype == torch.float64 else torch.float32
    exact = w.to(compute)  # w itself when it is already in the compute dtype
    exact.add_(d.to(compute), alpha=sign)  # sign is +-1: exact scaling, same sum as W + sign*dW
    out = exact.to(w.dtype)
    if not _all_finite(out):
        bad = int((~torch.isfinite(out)).sum())
        raise FoldError(f"tensor {name}: W {'+' if sign > 0 else '-'} dW has {bad} NaN/Inf "
                        f"values in {str(w.dtype).split('.')[-1]}; refusing to write it")
    if out.dtype == compute or not out.numel():  # no cast happened
        return out, 0.0
    return out, float(out.to(compute).sub_(exact).abs_().max())


def _all_finite(t: torch.Tensor) -> bool:
    """True when no element is NaN or Inf.

    Fast path: a NaN or Inf anywhere makes the fp32 (fp64) sum non-finite, so a finite sum
    proves the tensor finite; only a non-finite sum (possibly an overflow of finite values)
    needs the elementwise check.
    """
    import torch

    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(t).all())


def _crc32(data) -> str:
    return f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"


def _crc32_entry(entry: TensorEntry) -> str:
    """CRC-32 of a tensor's stored bytes, read in chunks."""
    crc = 0
    with open(entry.shard, "rb") as fh:
        fh.seek(entry.begin)
        left = entry.nbytes
        while left:
            chunk = fh.read(min(COPY_CHUNK, left))
            if not chunk:
                raise ModelError(f"{entry.shard}: truncated at tensor {entry.name}")
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
    return f"{crc & 0xFFFFFFFF:08x}"


def delta_fingerprint(delta: LensDelta) -> str:
    """Identity of a delta's contents, independent of where it is stored.

    sha256 of the sorted lines ``"<name> <shape> <CRC-32 of the fp32 bytes>"``, one per tensor
    (CRC-32 runs about eight times faster than sha256; this guards against mix-ups, not
    against forgery, for which the base hashes recorded in the delta are the check).
    """
    lines = []
    for name in sorted(delta.tensors):
        t = delta.tensors[name].detach().float().contiguous().cpu()
        lines.append(f"{name} {list(t.shape)} {_crc32(_tensor_bytes(t))}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# --------------------------------------------------------------------------- sources


@dataclass
class _Source:
    """The weights of a checkpoint directory: shard files and where each tensor lives."""

    root: Path
    kind: str  # "safetensors" | "pickle"
    shards: list[str]
    weight_map: dict[str, str]
    index_name: str | None
    index_metadata: dict


def _open_source(root: Path, allow_pickle: bool) -> _Source:
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
    return _Source(root, "safetensors", [s.name for s in ck.shards], dict(ck.index),
                   SAFE_INDEX if ck.sharded else None, dict(ck.index_metadata))


def _open_pickle(root: Path) -> _Source:
    idx = root / PICKLE_INDEX
    if idx.is_file():
        wm, shards, metadata = read_index(idx)
        return _Source(root, "pickle", shards, wm, PICKLE_INDEX, metadata)
    state = _load_pickle(root / PICKLE_SINGLE)
    return _Source(root, "pickle", [PICKLE_SINGLE], {n: PICKLE_SINGLE for n in state}, None, {})


def _load_pickle(path: Path) -> dict:
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is reported the same way
        raise ModelError(f"{path}: torch.load(weights_only=True) failed: {exc}") from exc
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _out_shard_name(src: _Source, shard: str) -> str:
    if src.kind == "safetensors":
        return shard
    if shard == PICKLE_SINGLE:
        return SAFE_SINGLE
    stem = shard[:-4] if shard.endswith(".bin") else shard
    return stem.replace("pytorch_model", "model", 1) + ".safetensors"


def _check_inputs(src: _Source, delta: LensDelta, expected: dict[str, str] | None,
                  pool: ThreadPoolExecutor | None = None, algo: str = "sha256") -> None:
    """Every delta tensor exists in the source with its shape and (if given) its hash.

    Args:
        expected: tensor name -> recorded hash of its stored bytes (None: no hash check).
        pool: hash the stored tensors on these worker threads (hashing releases the GIL).
        algo: ``sha256`` (base hashes recorded in a delta) or ``crc32`` (fold records).

    Raises:
        DeltaError: naming the tensor, and for a hash mismatch both hashes.
    """
    from lens_merge.checkpoint import hash_tensor_bytes

    finite = {n: pool.submit(_all_finite, d) if pool is not None else _all_finite(d)
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
            hasher = hash_entry if algo == "sha256" else _crc32_entry
        else:
            state = _load_pickle(src.root / shard)
            found = {n: (tuple(state[n].shape), state[n]) for n in names}
            hasher = (hash_tensor_bytes if algo == "sha256"
                      else lambda t: _crc32(_tensor_bytes(t)))
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


def _check_tied(root: Path, src: _Source, delta: LensDelta) -> None:
    """Refuse a delta on lm_head when the config ties it to the embeddings (it would be lost)."""
    names = [n for n in delta.tensors if n.endswith("lm_head.weight")]
    if not names:
        return
    from transformers import AutoConfig

    if getattr(AutoConfig.from_pretrained(str(root)), "tie_word_embeddings", False):
        raise FoldError(f"delta changes {names[0]}, but {root}/config.json ties it to the input "
                        "embeddings; the change would be dropped on load")


# --------------------------------------------------------------------------- shard passes


def _out_hashes(raw, sha256: bool) -> dict[str, str]:
    out = {"out_crc32": _crc32(raw)}
    if sha256:
        out["out_sha256"] = hashlib.sha256(raw).hexdigest()
    return out


class _OutputHashes:
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


def _shard_meta(base_meta: dict, operation: str, fingerprint: str, n_changed: int) -> dict:
    meta = {k: str(v) for k, v in base_meta.items() if not k.startswith(_META_PREFIX)}
    meta.setdefault("format", "pt")
    meta.update({f"{_META_PREFIX}operation": operation,
                 f"{_META_PREFIX}version": __version__,
                 f"{_META_PREFIX}changed_tensors": str(n_changed),
                 f"{_META_PREFIX}delta_fingerprint": fingerprint,
                 f"{_META_PREFIX}time": now_iso()})
    return meta


def _rewrite_safetensors(path: Path, dest: Path, delta: LensDelta, sign: float, meta: dict,
                         records: dict, hashes: _OutputHashes) -> None:
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
                if e.dtype not in _ST_DTYPES:
                    raise FoldError(f"tensor {name} in {path}: dtype {e.dtype} is not a float "
                                    "type; a delta can only change float tensors")
                fh.seek(e.begin)
                buf = bytearray(fh.read(e.nbytes))
                w = torch.frombuffer(buf, dtype=getattr(torch, _ST_DTYPES[e.dtype]))
                out, err = _apply(w.reshape(e.shape), d, sign, name)
                raw = _tensor_bytes(out)
                records[name] = {"shard": dest.name, "dtype": e.dtype, "max_cast_error": err}
                writer.write(name, raw)
                hashes.submit(name, raw)
                del buf, w, out, raw
        writer.close()
        hashes.flush()
    finally:
        writer.abort()


def _convert_pickle(path: Path, dest: Path, delta: LensDelta, sign: float, meta: dict,
                    records: dict, hashes: _OutputHashes) -> list[str]:
    state = _load_pickle(path)
    header: dict[str, Any] = {}
    off = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _st_dtype(t), "shape": list(t.shape),
                        "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = meta
    writer = ShardWriter(dest, header)
    try:
        for name, t in state.items():
            d = delta.delta_for(name)
            if d is not None:
                t, err = _apply(t, d, sign, name)
                raw = _tensor_bytes(t)
                records[name] = {"shard": dest.name, "dtype": header[name]["dtype"],
                                 "max_cast_error": err}
                writer.write(name, raw)
                hashes.submit(name, raw)
            else:
                writer.write(name, _tensor_bytes(t))
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


def _copy_other_files(src: _Source, tmp: Path) -> list[str]:
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


def _prepare_out(out: Path, base_dir: Path, overwrite: bool) -> None:
    b, o = base_dir.resolve(), out.resolve()
    if o == b or o in b.parents or b in o.parents:
        raise FoldError(f"output {out} is, contains or lies inside the input checkpoint "
                        f"{base_dir}; choose another output directory")
    if out.exists() and not overwrite:
        raise FoldError(f"output {out} exists; pass --overwrite (overwrite=True) to replace it")


def _move_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists() or out.is_symlink():
        if out.is_dir() and not out.is_symlink():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        else:
            out.unlink()
    ordinary_permissions(tmp)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _resolve_base(base: str | Path) -> Path:
    from lens_merge.models import resolve_model

    return resolve_model(base)


def _resolve_delta(delta: LensDelta | str | Path) -> LensDelta:
    from lens_merge.delta import LensDelta

    return delta if isinstance(delta, LensDelta) else LensDelta.load(delta)


def _run(operation: str, base_ref: str, base_dir: Path, delta: LensDelta, out: Path, *,
         expected: dict[str, str] | None, link: bool, overwrite: bool, allow_pickle: bool,
         progress: Progress, provenance: dict) -> tuple[FoldReport, dict]:
    """The shared fold/unfold walk. Returns the report and the per-tensor records."""
    t0 = time.perf_counter()
    _prepare_out(out, base_dir, overwrite)
    src = _open_source(base_dir, allow_pickle)
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lens-merge-hash")
    try:
        _check_inputs(src, delta, expected, pool, "sha256" if operation == "fold" else "crc32")
        _check_tied(base_dir, src, delta)
        checked = time.perf_counter() - t0
        hashes = _OutputHashes(pool, {}, sha256=operation == "unfold")
        rep, records = _write(operation, base_ref, base_dir, src, delta, out,
                              delta_fingerprint(delta), hashes, expected is not None, link,
                              progress, provenance, t0)
        rep.check_seconds = checked
        return rep, records
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _write_shards(operation: str, src: _Source, delta: LensDelta, tmp: Path, fingerprint: str,
                  hashes: _OutputHashes, link: bool, progress: Progress, rep: FoldReport
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
                path, dest_name = src.root / shard, _out_shard_name(src, shard)
                n = changed.get(shard, 0)
                if src.kind == "safetensors" and not n:
                    placed[dest_name] = copier.submit(_place_shard, path, tmp / dest_name, link)
                    continue
                if src.kind == "pickle":
                    meta = _shard_meta({"format": "pt"}, operation, fingerprint, n)
                    names = _convert_pickle(path, tmp / dest_name, delta, sign, meta,
                                            hashes.records, hashes)
                    weight_map.update({k: dest_name for k in names})
                else:
                    hdr, _ = read_safetensors_header(path)
                    meta = _shard_meta(dict(hdr.get("__metadata__") or {}), operation,
                                       fingerprint, n)
                    _rewrite_safetensors(path, tmp / dest_name, delta, sign, meta,
                                         hashes.records, hashes)
                rep.rewritten.append(dest_name)
                task.advance()
            for dest_name, job in placed.items():
                (rep.linked if job.result() else rep.copied).append(dest_name)
                task.advance()
    finally:
        copier.shutdown(wait=True, cancel_futures=True)
    return weight_map


def _write(operation: str, base_ref: str, base_dir: Path, src: _Source, delta: LensDelta,
           out: Path, fingerprint: str, hashes: _OutputHashes, hashes_checked: bool,
           link: bool, progress: Progress, provenance: dict, t0: float
           ) -> tuple[FoldReport, dict]:
    """Write the output into a temporary sibling and rename it into place (after the checks)."""
    rep = FoldReport(operation=operation, out=out, base=base_ref, source_format=src.kind,
                     changed_tensors=len(delta.tensors), hashes_checked=hashes_checked)
    records: dict[str, dict] = hashes.records
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        weight_map = _write_shards(operation, src, delta, tmp, fingerprint, hashes, link,
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
        prov = {"format": FORMAT, "format_version": FORMAT_VERSION, "operation": operation,
                f"{operation}ed_at": now_iso(), "tool": tool_info(), **provenance,
                "delta": delta.meta, "delta_fingerprint": fingerprint, "tensors": records,
                "report": {k: v for k, v in rep.to_dict().items() if k != "out"}}
        previous = base_dir / PROVENANCE_FILE
        if previous.is_file():
            try:
                prov["previous"] = json.loads(previous.read_text())
            except json.JSONDecodeError:
                prov["previous"] = {"unreadable": str(previous)}
        write_json_atomic(tmp / PROVENANCE_FILE, prov)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rep.seconds = time.perf_counter() - t0
    return rep, records


def fold(
    base: str | Path,
    delta: LensDelta | str | Path,
    out: str | Path,
    *,
    link: bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: Progress = NULL,
) -> FoldReport:
    """Fold a Lens delta into a standalone Hugging Face checkpoint (W + dW, streamed).

    Args:
        base: ``default`` or a local HF directory (safetensors, one or many shards).
        delta: a ``LensDelta`` or the path of a delta directory.
        out: output directory; written atomically (temporary sibling, then rename).
        link: hardlink unchanged shards instead of copying them (same filesystem only;
            falls back to a copy).
        overwrite: replace an existing ``out``.
        allow_pickle: accept a ``.bin`` checkpoint, loaded with torch.load(weights_only=True);
            the output is then written as safetensors.
        progress: progress reporter.

    Returns:
        The ``FoldReport``.

    Raises:
        DeltaError: a delta tensor is missing from the base, has another shape, or the base
            tensor's sha256 differs from the one recorded in the delta (both hashes named).
        FoldError: pickle refused, NaN/Inf in the result, an existing output, a delta on a tied
            lm_head.
    """
    base_dir = _resolve_base(base)
    d = _resolve_delta(delta)
    expected = {n: d.base_hash(n) for n in d.tensors}
    rep, _ = _run("fold", str(base), base_dir, d, Path(out), expected=expected, link=link,
                  overwrite=overwrite, allow_pickle=allow_pickle, progress=progress,
                  provenance={"base": {"ref": str(base), "path": str(base_dir)}})
    return rep


def unfold(
    folded: str | Path,
    delta: LensDelta | str | Path,
    out: str | Path,
    *,
    link: bool = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: Progress = NULL,
) -> FoldReport:
    """Recover the base from a folded checkpoint (W = folded - dW, same dtype rules as fold).

    When ``folded`` carries the ``lens_merge.json`` a fold wrote, the delta must be the one
    it was folded with (same fingerprint) and the folded tensors must still have their recorded
    CRC-32. The recovered bytes equal the base exactly whenever W + dW was exact in the stored
    dtype (as for a delta taken between two fp32 weight sets whose elements lie within a factor
    of two of each other, Sterbenz); otherwise an element can differ from the base by the
    rounding of the folded value (at most half an ulp of W + dW). ``restored_exact`` lists the
    tensors whose recovered bytes have the base sha256 recorded in the delta.

    Args:
        folded: a folded checkpoint directory.
        delta: the ``LensDelta`` (or its path) that was folded in.
        out: output directory (atomic, like ``fold``).
        link, overwrite, allow_pickle, progress: as for ``fold``.

    Returns:
        The ``FoldReport`` (with ``restored_exact`` filled in).

    Raises:
        DeltaError: the delta is not the one recorded in ``folded``, or a folded tensor's bytes
            changed since the fold.
        FoldError: as for ``fold``.
    """
    folded_dir = _resolve_base(folded)
    d = _resolve_delta(delta)
    expected = None
    prov_path = folded_dir / PROVENANCE_FILE
    if prov_path.is_file():
        prov = json.loads(prov_path.read_text())
        if prov.get("format") == FORMAT and prov.get("operation") == "fold":
            fp = delta_fingerprint(d)
            if prov.get("delta_fingerprint") != fp:
                raise DeltaError(f"{prov_path}: folded with the delta of fingerprint "
                                 f"{prov.get('delta_fingerprint')}, but this delta is {fp}")
            recs = prov.get("tensors", {})
            expected = {n: recs[n]["out_crc32"] for n in d.tensors
                        if "out_crc32" in recs.get(n, {})}
            if len(expected) != len(d.tensors):
                expected = None
    rep, records = _run("unfold", str(folded), folded_dir, d, Path(out), expected=expected,
                        link=link, overwrite=overwrite, allow_pickle=allow_pickle,
                        progress=progress, provenance={"folded": {"ref": str(folded),
                                                                  "path": str(folded_dir)}})
    base_hashes = {n: d.meta.get("tensors", {}).get(n, {}).get("base_sha256") for n in records}
    rep.restored_exact = sorted(n for n, r in records.items()
                                if r["out_sha256"] == base_hashes.get(n))
    return rep


from lens_merge._fold_verify import verify_fold  # noqa: E402  (re-exported public API)

__all__ = ["FoldReport", "delta_fingerprint", "fold", "unfold", "verify_fold"]
