"""The manifest of a release folder: every file the pipeline wrote, with its size and sha256.

``lens-merge push`` uploads exactly these files and nothing else found in the folder (a log a
user left there, a symlink, a token file). The manifest lives in ``.lens_merge/manifest.json``
beside the pipeline state; stages record their outputs after they finish.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from lens_merge.errors import PublishError, RecordError
from lens_merge.files import file_sha256, write_json_atomic
from lens_merge.records import ReleaseLayout, read_record

MANIFEST = ReleaseLayout.model_fields["manifest"].default


class ManifestEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """``{relative path: entry}`` of every file the release made."""

    model_config = ConfigDict(extra="forbid")

    format: str = "lens-merge-manifest/1"
    files: dict[str, ManifestEntry] = Field(default_factory=dict)


def manifest_path(layout: ReleaseLayout) -> Path:
    return layout.root / MANIFEST


def load(layout: ReleaseLayout) -> Manifest:
    """The release's manifest (empty when there is none yet)."""
    p = manifest_path(layout)
    if not p.is_file():
        return Manifest()
    return read_record(p, Manifest)


def _regular_files(paths: list[Path]) -> list[Path]:
    out = []
    for p in paths:
        if p.is_symlink():
            continue
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.is_symlink()
                          and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            out.append(p)
    return out


def record(layout: ReleaseLayout, stage: str, outputs: list[Path]) -> Manifest:
    """Record the files under ``outputs`` (files or folders) as made by ``stage``.

    Entries the stage recorded before and that are gone now are dropped; hidden files and
    symlinks are never recorded.
    """
    try:
        man = load(layout)
    except RecordError:
        man = Manifest()  # a damaged manifest is rebuilt from the stages that run
    root = layout.root.resolve()
    within = [p.resolve().relative_to(root).as_posix() for p in outputs if p.exists()]
    for rel, e in list(man.files.items()):
        if e.stage == stage or any(rel == w or rel.startswith(w + "/") for w in within):
            del man.files[rel]
    for f in _regular_files(outputs):
        rel = f.resolve().relative_to(root).as_posix()
        man.files[rel] = ManifestEntry(stage=stage, size=f.stat().st_size,
                                       sha256=file_sha256(f))
    write_json_atomic(manifest_path(layout), man)
    return man


def checked_files(layout: ReleaseLayout) -> list[tuple[Path, str]]:
    """``(local path, relative path)`` of every manifest entry, each checked to be a regular
    file (no symlink) with the recorded size and sha256.

    Raises:
        PublishError: no manifest, or a file missing, replaced by a link, or changed.
    """
    p = manifest_path(layout)
    if not p.is_file():
        raise PublishError(f"{layout.root}: no manifest ({MANIFEST}); only folders made by "
                           "`lens-merge run` can be pushed (rerun it)")
    try:
        man = read_record(p, Manifest)
    except RecordError as exc:
        raise PublishError(str(exc)) from None
    out = []
    for rel, e in sorted(man.files.items()):
        f = layout.root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise PublishError(f"{p}: entry {rel!r} points outside the release folder")
        if f.is_symlink() or any(q.is_symlink() for q in f.parents if q != layout.root
                                 and layout.root in q.parents):
            raise PublishError(f"{f}: is a symbolic link; the release made a regular file "
                               "here and links are never published")
        if not f.is_file():
            raise PublishError(f"{f}: missing (listed in {MANIFEST}); rerun `lens-merge run`")
        if f.stat().st_size != e.size or file_sha256(f) != e.sha256:
            raise PublishError(f"{f}: changed since the {e.stage} stage wrote it (size or "
                               f"sha256 differs from {MANIFEST}); rerun that stage")
        out.append((f, rel))
    return out
