"""Provenance records written beside every artifact: tool version, times, hashes."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from datetime import UTC, datetime
from typing import Any

from lens_merge import __version__
from lens_merge.errors import ConfigError


def now_iso() -> str:
    """Current UTC time, ISO 8601, second precision (for reports and logs)."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def build_time() -> str | None:
    """The time to stamp into an artifact: ``SOURCE_DATE_EPOCH`` when set, else None.

    Artifacts (GGUF, delta, folded checkpoint) carry no wall-clock time by default, so the same
    inputs give byte-identical files (as llama.cpp's converter does); set SOURCE_DATE_EPOCH
    (reproducible-builds.org) to stamp a fixed one.

    Raises:
        ConfigError: when SOURCE_DATE_EPOCH is set but not an integer.
    """
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None or raw.strip() == "":
        return None
    try:
        return datetime.fromtimestamp(int(raw), UTC).isoformat()
    except (ValueError, OverflowError, OSError) as exc:
        raise ConfigError(f"SOURCE_DATE_EPOCH={raw!r}: expected seconds since 1970 as an "
                         "integer") from exc


def stamp() -> dict[str, str]:
    """``{"created": build_time()}`` when SOURCE_DATE_EPOCH is set, else nothing: records
    written into artifacts carry no wall-clock time, so reruns give the same bytes."""
    t = build_time()
    return {"created": t} if t else {}


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
