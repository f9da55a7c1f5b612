"""Typed errors. Every message names the file, field or tensor at fault and what was expected."""

from __future__ import annotations

from typing import Any


class LensMergeError(Exception):
    """Base class of every error lens_merge raises on purpose (the CLI prints these cleanly)."""


class ConfigError(LensMergeError):
    """A recipe or option is invalid (unknown key, wrong type, bad value)."""


class DataError(LensMergeError):
    """Input data is malformed: missing language, empty text, unknown format."""


class ModelError(LensMergeError):
    """A model directory or checkpoint cannot be used (missing files, unsupported architecture)."""


class DeltaError(LensMergeError):
    """A Lens delta does not match its base (hash mismatch, missing tensor, bad shape)."""


class FoldError(LensMergeError):
    """Folding or unfolding cannot proceed safely (pickle refused, NaN/Inf, existing output)."""


class ExportError(LensMergeError):
    """An export cannot be written (unsupported architecture, tokenizer, output type)."""


class AdapterError(LensMergeError):
    """A delta cannot become an adapter (embeddings/lm_head, rank larger than the tensor,
    adapter for a different base)."""


class VerificationError(LensMergeError):
    """A parity check exceeded its tolerance. Carries the measured numbers.

    ``report`` is the ``lens_merge.records.ParityReport`` (or ``ParitySet``) of the check.
    """

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class PublishError(LensMergeError):
    """A release folder cannot be published (failed verification, missing files, Hub error)."""


class RecordError(LensMergeError):
    """A JSON file the tool reads back is missing, unreadable or of the wrong shape."""


class OutputError(LensMergeError):
    """An output path cannot be used: it is, holds or lies inside an input, its parent is a
    file, it is not writable, or the disk refused the write (full, read-only, too large)."""
