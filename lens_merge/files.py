"""Writing files safely: every artifact appears complete or not at all.

- ``atomic_file(path)``: a context manager yielding a temporary sibling path; on success it is
  given ordinary permissions and renamed over ``path``, on any exception it is removed.
- ``atomic_dir(out, overwrite=...)``: the same for a directory (the previous one is kept
  until the new one is in place, then removed).
- ``write_json_atomic`` / ``write_text_atomic``: the common cases.
- ``ordinary_permissions``: 0666/0777 less the umask, recursively.
- ``file_sha256``: streamed sha256 of a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMP_MARK = ".lens-tmp-"  # every temporary sibling's name contains this


def umask() -> int:
    """The process umask (read without changing it for longer than a call)."""
    m = os.umask(0)
    os.umask(m)
    return m


def ordinary_permissions(path: str | Path) -> None:
    """Give a finished artifact the modes of ordinary files: 0666/0777 less the umask.

    ``tempfile`` makes 0600 files and 0700 directories, and safetensors writes 0600 files;
    a released model must be readable by the people it is shared with. Applies recursively
    to a directory. Hardlinked files (``fold --link``) are left alone: their mode belongs to
    the other name too.
    """
    mask = umask()
    p = Path(path)
    items = [p, *p.rglob("*")] if p.is_dir() else [p]
    for f in items:
        if f.is_symlink() or (f.is_file() and f.stat().st_nlink > 1):
            continue
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)


def temp_sibling(path: str | Path, tag: str = "") -> Path:
    """A fresh, not yet existing path beside ``path`` (same filesystem, so rename is atomic)."""
    p = Path(path)
    return p.parent / f"{TEMP_MARK}{p.name}.{tag + '.' if tag else ''}{uuid.uuid4().hex[:8]}"


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: nothing was written for {path}")
        ordinary_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it takes the place of ``out``.

    An existing ``out`` is replaced only with ``overwrite`` (callers check first, with the
    error of their own kind); it is moved aside and removed once the new one is in place, and
    put back when the rename fails.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        yield tmp
        ordinary_permissions(tmp)
        replace_dir(tmp, out, overwrite)
    except BaseException:
        _remove(tmp)
        raise


def replace_dir(tmp: Path, out: Path, overwrite: bool = True) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is replaced (only with ``overwrite``)."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{out} exists")
        old = temp_sibling(out, "old")
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)
            raise
        _remove(old)
    else:
        tmp.rename(out)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 text through a temporary sibling and an atomic rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON (indented, UTF-8, newline-terminated) atomically. Pydantic models welcome."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json", by_alias=True)
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    """sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
