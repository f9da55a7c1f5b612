"""Fold a Lens delta into a standalone Hugging Face checkpoint, and unfold it.

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

``unfold`` is the same walk with W - dW. ``verify_fold`` (re-exported from
``lens_merge.weights.verify``) compares the base with the delta applied in memory against the
folded checkpoint reloaded with plain transformers.

Modules: ``_source`` opens the input and checks the delta fits it, ``_write`` writes the
output, ``_tensors`` holds the arithmetic and hashes both use.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from lens_merge.errors import DeltaError, FoldError
from lens_merge.guard import check_output, check_writable_parent, cleanup_stale_temps, exists
from lens_merge.progress import NULL, Progress
from lens_merge.records import FoldProvenance, read_json, validate_record
from lens_merge.weights._report import (
    FORMAT,
    FORMAT_VERSION,
    PROVENANCE_FILE,
    WEIGHT_SUFFIXES,
    FoldReport,
)
from lens_merge.weights._source import (
    check_inputs,
    check_tied,
    open_source,
    resolve_base,
    resolve_delta,
)
from lens_merge.weights._tensors import delta_fingerprint
from lens_merge.weights._write import OutputHashes, write_output
from lens_merge.weights.verify import verify_fold

if TYPE_CHECKING:
    from lens_merge.weights.delta import LensDelta

__all__ = ["FORMAT", "FORMAT_VERSION", "PROVENANCE_FILE", "WEIGHT_SUFFIXES", "FoldReport",
           "delta_fingerprint", "fold", "unfold", "verify_fold"]


def _prepare_out(out: Path, inputs: dict[str, Path | None], overwrite: bool) -> None:
    """Refuse an output that is, holds or lies in an input (``guard.check_output``) or that
    exists without ``overwrite``; remove the temporaries a killed run left beside it."""
    check_output(out, inputs)
    check_writable_parent(out)
    cleanup_stale_temps(out)
    if exists(out) and not overwrite:
        raise FoldError(f"output {out} exists; pass --overwrite (overwrite=True) to replace it")


def _run(operation: str, base_ref: str, base_dir: Path, delta: LensDelta, out: Path, *,
         expected: dict[str, str] | None, link: bool, overwrite: bool, allow_pickle: bool,
         progress: Progress, provenance: dict) -> tuple[FoldReport, dict]:
    """The shared fold/unfold walk. Returns the report and the per-tensor records."""
    t0 = time.perf_counter()
    _prepare_out(out, {"base checkpoint": base_dir, "delta": delta.path}, overwrite)
    src = open_source(base_dir, allow_pickle)
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lens-merge-hash")
    try:
        check_inputs(src, delta, expected, pool, "sha256" if operation == "fold" else "crc32")
        check_tied(base_dir, delta)
        rep = FoldReport(operation=operation, out=out, base=base_ref, source_format=src.kind,
                         changed_tensors=len(delta.tensors), hashes_checked=expected is not None,
                         check_seconds=time.perf_counter() - t0)
        hashes = OutputHashes(pool, {}, sha256=operation == "unfold")
        records = write_output(rep, base_dir, src, delta, delta_fingerprint(delta), hashes,
                               link, progress, provenance, t0)
        return rep, records
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _fold_records(prov_path: Path, delta: LensDelta) -> dict[str, str] | None:
    """CRC-32 of each folded tensor recorded by the fold that wrote ``prov_path`` (None when
    the file is not a fold record, or does not record every tensor of ``delta``).

    Raises:
        DeltaError: the checkpoint was folded with another delta.
        RecordError: the file is unreadable or a malformed fold record.
    """
    raw = read_json(prov_path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("operation") != "fold":
        return None
    prov = validate_record(raw, FoldProvenance, prov_path)
    fp = delta_fingerprint(delta)
    recorded = getattr(prov, "delta_fingerprint", None)
    if recorded != fp:
        raise DeltaError(f"{prov_path}: folded with the delta of fingerprint {recorded}, but "
                         f"this delta is {fp}")
    recs = getattr(prov, "tensors", None) or {}
    expected = {n: recs[n]["out_crc32"] for n in delta.tensors
                if isinstance(recs.get(n), dict) and "out_crc32" in recs[n]}
    return expected if len(expected) == len(delta.tensors) else None


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
    base_dir = resolve_base(base)
    d = resolve_delta(delta)
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
    folded_dir = resolve_base(folded)
    d = resolve_delta(delta)
    prov_path = folded_dir / PROVENANCE_FILE
    expected = _fold_records(prov_path, d) if prov_path.is_file() else None
    rep, records = _run("unfold", str(folded), folded_dir, d, Path(out), expected=expected,
                        link=link, overwrite=overwrite, allow_pickle=allow_pickle,
                        progress=progress, provenance={"folded": {"ref": str(folded),
                                                                  "path": str(folded_dir)}})
    base_hashes = {n: d.meta.get("tensors", {}).get(n, {}).get("base_sha256") for n in records}
    rep.restored_exact = sorted(n for n, r in records.items()
                                if r["out_sha256"] == base_hashes.get(n))
    return rep

