"""Exporters of folded checkpoints, registered by name in one explicit dict.

``get("gguf")`` returns the module that implements an exporter (``export_*`` and
``verify_*`` functions); an unknown name raises an error listing the known ones.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lens_merge.errors import ExportError

EXPORTERS: dict[str, str] = {
    "gguf": "lens_merge.export.gguf",
    "onnx": "lens_merge.export.onnx",
}


def names() -> list[str]:
    """Names of every registered exporter."""
    return sorted(EXPORTERS)


def get(name: str) -> ModuleType:
    """The module implementing exporter ``name``.

    Raises:
        ExportError: when ``name`` is not registered, listing the known names.
    """
    try:
        path = EXPORTERS[name]
    except KeyError:
        raise ExportError(f"unknown exporter {name!r}; known: {', '.join(names())}") from None
    return importlib.import_module(path)
