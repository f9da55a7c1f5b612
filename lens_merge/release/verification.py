"""The verification records of a release folder, read through ``records.ParitySet``.

Every verifier writes the same shape (``report/fold_verify.json``, ``report/gguf_verify.json``,
``report/onnx_verify.json`` and the ONNX folder's own record), so the card and the publisher
read ``passed`` and ``metrics`` instead of searching for keys.
"""

from __future__ import annotations

from typing import Any

from lens_merge.errors import PublishError, RecordError
from lens_merge.records import ParitySet, ReleaseLayout, read_json, validate_record

ONNX_RECORD = "onnx/lens_merge_export.json"
KINDS = ("fold", "gguf", "onnx", "adapters")


def read_parity(layout: ReleaseLayout, kind: str) -> ParitySet | None:
    """The verification record of one kind, or None when that check was not run.

    Raises:
        PublishError: when the file exists but is not a valid ``ParitySet``.
    """
    path = layout.root / layout.verify_files[kind]
    if not path.is_file():
        return None
    try:
        return validate_record(read_json(path), ParitySet, path)
    except RecordError as exc:
        raise PublishError(f"{exc} (rerun the {kind} stage to write it again)") from None


def read_onnx_record(layout: ReleaseLayout) -> ParitySet | None:
    """The verification stored in the ONNX folder's provenance file (None when absent)."""
    path = layout.root / ONNX_RECORD
    if not path.is_file():
        return None
    try:
        rec = read_json(path)
        v = rec.get("verification") if isinstance(rec, dict) else None
        return None if v is None else validate_record(v, ParitySet, f"{path} (verification)")
    except RecordError as exc:
        raise PublishError(str(exc)) from None


def release_parity(layout: ReleaseLayout) -> dict[str, ParitySet | None]:
    """Every verification record of a release, by kind (ONNX: the report file, else the
    folder's own record)."""
    out = {k: read_parity(layout, k) for k in KINDS}
    if out["onnx"] is None:
        out["onnx"] = read_onnx_record(layout)
    return out


def failures(layout: ReleaseLayout) -> list[str]:
    """One line per failed check in any record of the release (file named)."""
    out = []
    for kind, ps in release_parity(layout).items():
        if ps is not None:
            where = layout.verify_files[kind]
            out += [f"{where}: {f}" for f in ps.failures]
    return out


def status(ps: ParitySet | None) -> str:
    """``passed``, ``failed`` or ``not run``."""
    if ps is None or not ps.reports:
        return "not run"
    return "passed" if ps.passed else "failed"


HEADLINE = ("max_abs_logit_diff", "top1_agreement", "kl_mean", "generation_match",
            "first_token_agreement")


def key_numbers(report: Any, limit: int = 5) -> list[tuple[str, float]]:
    """The headline metrics of one ``ParityReport`` worth showing, in a fixed order."""
    m = report.metrics
    return [(k, float(m[k])) for k in HEADLINE if m.get(k) is not None][:limit]
