"""The export record ``lens_merge_export.json``: what was exported, from what, with which
files (bytes and sha256), and the last verification (a ``records.ParitySet`` dump, or null
until ``verify_onnx`` runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lens_merge.errors import ExportError, RecordError
from lens_merge.files import file_sha256
from lens_merge.records import ParitySet, read_json, validate_record

PROVENANCE_FILE = "lens_merge_export.json"
FORMAT = "lens-merge-onnx-export"
GRAPH = "model.onnx"
INT8_GRAPH = "model_int8.onnx"
STATUSES = ("passed", "failed", "not_run", "missing")


class ExportedFile(BaseModel):
    """One file of an export folder."""

    model_config = ConfigDict(extra="allow")

    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ExportRecord(BaseModel):
    """``lens_merge_export.json`` (extra keys kept: ``tool``, ``source``, timings).

    ``options`` holds ``task``, ``exporter`` (``dynamo`` or ``optimum``; absent from records
    written before the dynamo exporter, which all came from optimum: ``record_exporter``),
    ``dtype``, ``quantize``, ``device``, ``opset``, ``external_data``, ``kv_heads`` and
    ``head_dim``.
    """

    model_config = ConfigDict(extra="allow")

    format: Literal["lens-merge-onnx-export"]
    format_version: int = Field(ge=1)
    graph: str = GRAPH
    options: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, ExportedFile] = Field(default_factory=dict)
    quantized: dict[str, Any] | None = None
    verification: dict[str, Any] | None = None


def record_exporter(rec: dict[str, Any]) -> str:
    """The exporter that wrote a record's graph (``optimum`` for records that predate the
    ``exporter`` option)."""
    return str((rec.get("options") or {}).get("exporter", "optimum"))


def files_record(root: Path) -> dict[str, dict[str, Any]]:
    """Every file of an export (but the provenance file): bytes and sha256."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != PROVENANCE_FILE:
            out[p.relative_to(root).as_posix()] = {"bytes": p.stat().st_size,
                                                   "sha256": file_sha256(p)}
    return out


def graph_files(graph: str, files: dict[str, Any]) -> list[str]:
    """A graph and its external data (``<graph>_data`` / ``<graph>.data``) among ``files``."""
    return [k for k in files
            if k == graph or k.startswith(graph + "_data") or k.startswith(graph + ".data")]


def graph_bytes(graph: str, files: dict[str, dict[str, Any]]) -> int:
    """Size of a graph with its external data."""
    return sum(files[k]["bytes"] for k in graph_files(graph, files))


def source_record(checkpoint: Path) -> dict[str, Any]:
    """Where an export came from: the checkpoint path, model type and its own provenance."""
    cfg = read_json(checkpoint / "config.json")
    rec: dict[str, Any] = {"path": str(checkpoint.resolve()), "model_type": cfg.get("model_type"),
                           "architectures": cfg.get("architectures")}
    for name in ("lens_merge.json", "lens_merge_default.json"):
        p = checkpoint / name
        if p.is_file():
            try:
                rec[name] = read_json(p)
            except RecordError:
                rec[name] = {"unreadable": str(p)}
    return rec


def read_export_record(out_dir: str | Path) -> dict[str, Any]:
    """The ``lens_merge_export.json`` of an export folder, validated as an ``ExportRecord``.

    Args:
        out_dir: the export folder.

    Returns:
        The record as parsed (a dict).

    Raises:
        ExportError: when the file is missing, unreadable or of the wrong shape.
    """
    p = Path(out_dir) / PROVENANCE_FILE
    if not p.is_file():
        raise ExportError(f"{p}: missing (not an ONNX export made by lens-merge)")
    try:
        rec = read_json(p)
        validate_record(rec, ExportRecord, p)
    except RecordError as exc:
        raise ExportError(str(exc)) from None
    return rec


def changed_files(out: Path, rec: dict[str, Any]) -> list[str]:
    """Files of the record that are missing or whose sha256 differs from the recorded one."""
    return [k for k, f in rec.get("files", {}).items()
            if not (out / k).is_file() or file_sha256(out / k) != f.get("sha256")]


def stored_verification(rec: dict[str, Any], where: str | Path) -> ParitySet | None:
    """The ``verification`` of a record as a ``ParitySet`` (None: not run yet).

    Raises:
        RecordError: when it is not a ParitySet (e.g. written by an older lens-merge).
    """
    ver = rec.get("verification")
    if not ver or ver.get("status") == "not_run":  # null, or an older "not_run" mark
        return None
    return validate_record(ver, ParitySet, f"{where}: verification")


def onnx_verification_status(out_dir: str | Path) -> str:
    """``passed``, ``failed``, ``not_run``, or ``missing`` (no readable provenance file).

    A folder whose files changed since verification reads ``failed``: only the bytes that
    were verified count as verified. So does a verification that cannot be read back as a
    ``records.ParitySet`` (verify again to replace it).
    """
    try:
        rec = read_export_record(out_dir)
    except ExportError:
        return "missing"
    root = Path(out_dir)
    try:
        ver = stored_verification(rec, root / PROVENANCE_FILE)
    except RecordError:
        return "failed"
    if ver is None:
        return "not_run"
    if not ver.reports or not ver.passed:
        return "failed"
    for rel, f in (rec.get("files") or {}).items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != f.get("bytes"):
            return "failed"
    return "passed"
