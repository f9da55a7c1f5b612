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


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, ensure_ascii=False, default=str)
            fh.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; provenance is meant to be read by anyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
