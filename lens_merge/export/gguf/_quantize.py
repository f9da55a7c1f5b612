"""K-quants (Q4_K_M, Q5_K_M, Q6_K) through llama.cpp's own quantizer.

``gguf.quants`` can only dequantize K-quants, so these files are made the way llama.cpp's
``llama-quantize`` makes them: from a lossless GGUF, with ``llama_model_quantize`` called
through llama-cpp-python's low-level API. llama.cpp picks the per-tensor types itself
(the _M mixes, and fallbacks for rows that are not a multiple of 256).
"""

from __future__ import annotations

import os
from pathlib import Path

from lens_merge.errors import ExportError
from lens_merge.export.gguf._types import OutType

EXTRA_HINT = "pip install 'lens-merge[llama]' (llama-cpp-python)"


def require_llama_cpp(what: str):
    """Import ``llama_cpp`` or raise an ExportError naming the extra that installs it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ExportError(f"{what} needs llama.cpp through llama-cpp-python: {EXTRA_HINT}") \
            from exc
    return llama_cpp


def quantize_with_llama_cpp(src: Path, dst: Path, outtype: OutType,
                            n_threads: int | None = None) -> None:
    """Quantize GGUF ``src`` into ``dst`` with llama.cpp.

    Args:
        src: a lossless (f32/f16/bf16) GGUF.
        dst: output path (written by llama.cpp; the caller renames it into place).
        outtype: a K-quant output type.
        n_threads: quantizer threads (default: up to 4 of the available cores).

    Raises:
        ExportError: when the extra is missing or llama.cpp reports a failure.
    """
    import ctypes

    llama_cpp = require_llama_cpp(f"--outtype {outtype.name}")
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{outtype.file_type}", None)
    if ftype is None:
        raise ExportError(f"this llama-cpp-python has no LLAMA_FTYPE_{outtype.file_type}; "
                          "upgrade it")
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads or min(4, os.cpu_count() or 1)
    with _quiet(llama_cpp):  # llama.cpp prints per-tensor fallbacks; we report them instead
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                            ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp could not quantize {src} to {outtype.label} "
                          f"(llama_model_quantize returned {rc})")


def _quiet(llama_cpp):
    """llama-cpp-python's stdout/stderr silencer (a no-op context when it is missing)."""
    from contextlib import nullcontext

    try:
        from llama_cpp._utils import suppress_stdout_stderr
    except ImportError:  # pragma: no cover - layout of other versions
        return nullcontext()
    return suppress_stdout_stderr(disable=False)
