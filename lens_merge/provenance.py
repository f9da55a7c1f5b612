"""Provenance records written beside every artifact: tool version, times, hashes."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lens_merge import __version__


def now_iso() -> str:
    """Current UTC time, ISO 8601, second precision."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def tool_info() -> dict[str, str]:
    """Name and version of this tool and of the stack that produced an artifact."""
    from importlib import metadata

    info = {"name": "lens-merge", "version": __version__, "python": platform.python_version()}
    for mod in ("torch", "transformers", "safetensors"):
        try:  # read from the installed metadata: importing transformers takes seconds
            info[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:  # optional in some contexts
            pass
    return info


def canonical_hash(obj: Any) -> str:
    """sha256 of an object's canonical JSON (sorted keys, no whitespace)."""
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(raw).hexdigest()


def ordinary_permissions(path: str | Path) -> None:
    """Give a finished artifact the modes of ordinary files: 0666/0777 less the umask.

    ``tempfile`` makes 0600 files and 0700 directories, and safetensors writes 0600 files;
    a released model must be readable by the people it is shared with. Applies recursively
    to a directory. Hardlinked files (``fold --link``) are left alone: their mode belongs to
    the other name too.
    """
    umask = os.umask(0)
    os.umask(umask)
    p = Path(path)
    items = [p, *p.rglob("*")] if p.is_dir() else [p]
    for f in items:
        if f.is_symlink() or (f.is_file() and f.stat().st_nlink > 1):
            continue
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, ensure_ascii=False, default=str)
            fh.write("\n")
        ordinary_permissions(tmp)  # mkstemp makes 0600; provenance is meant to be read by anyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
