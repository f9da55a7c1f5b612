"""Reading verification records (fold, GGUF, ONNX) without depending on their exact layout.

A record fails when any object in it says ``"passed": false`` or ``"status": "failed"``
(or ``fail``/``error``), at any depth; it passes when it says ``"passed": true`` somewhere and
fails nowhere.
"""

from __future__ import annotations

import math
import re
from typing import Any

FAILED_STATUSES = {"failed", "fail", "error"}
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{10,}")


def scrub(text: str, token: str | None = None) -> str:
    """Remove a token (and anything shaped like a Hugging Face token) from a string."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN.sub("hf_***", text)


def failures(obj: Any, where: str = "") -> list[str]:
    """JSON paths (``a.b[0]``) of every object in ``obj`` that records a failed check."""
    out: list[str] = []
    if isinstance(obj, dict):
        if obj.get("passed") is False:
            out.append(f"{where or '(top)'}.passed == false")
        st = obj.get("status")
        if isinstance(st, str) and st.lower() in FAILED_STATUSES:
            out.append(f"{where or '(top)'}.status == {st!r}")
        for k, v in obj.items():
            out += failures(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += failures(v, f"{where}[{i}]")
    return out


def _any_passed(obj: Any) -> bool:
    if isinstance(obj, dict):
        if obj.get("passed") is True or str(obj.get("status", "")).lower() in ("passed", "ok"):
            return True
        return any(_any_passed(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_any_passed(v) for v in obj)
    return False


def status(obj: Any) -> str:
    """``failed``, ``passed``, ``recorded`` (numbers but no verdict) or ``not run`` (None)."""
    if obj is None:
        return "not run"
    if failures(obj):
        return "failed"
    return "passed" if _any_passed(obj) else "recorded"


def key_numbers(obj: Any, limit: int = 6) -> list[tuple[str, float]]:
    """The scalar numbers of a verification record worth showing (diffs, tolerances, agreement).

    Top-level numbers first, then those of a nested ``verify`` object.
    """
    if not isinstance(obj, dict):
        return []
    out: list[tuple[str, float]] = []
    for src in (obj, obj.get("verify") if isinstance(obj.get("verify"), dict) else {}):
        for k, v in src.items():
            if isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if isinstance(v, float) and math.isnan(v):
                continue
            if k in ("size", "created", "n_layers", "format_version"):
                continue
            out.append((k, float(v)))
    return out[:limit]
