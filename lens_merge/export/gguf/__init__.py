"""GGUF export for llama.cpp, built from the ``gguf`` package's own building blocks.

Public API:
- ``export_gguf(checkpoint, out, outtype="f16", ...)``: write one GGUF (streamed, atomic).
- ``verify_gguf(checkpoint, gguf_path, ...)``: llama.cpp vs transformers, a
  ``records.ParityReport`` (limits: ``parity.thresholds.THRESHOLDS["gguf"]``).
- ``OUTTYPES`` / ``gguf_filename(name, outtype)``: the output types and release file names.
"""

from __future__ import annotations

from lens_merge.export.gguf._types import OUTTYPES, OutType, get_outtype, gguf_filename
from lens_merge.export.gguf._verify import verify_gguf
from lens_merge.export.gguf._writer import export_gguf, supported_model_types

__all__ = ["OUTTYPES", "OutType", "export_gguf", "get_outtype", "gguf_filename",
           "supported_model_types", "verify_gguf"]
