"""What a fold or unfold produces: its ``FoldReport`` and the identity of the provenance
file (``lens_merge.json``) written beside the weights. Shared by ``_write`` and ``fold``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lens_merge.records import FOLD_PROVENANCE_FILE

PROVENANCE_FILE = FOLD_PROVENANCE_FILE
FORMAT = "lens-merge-fold"
FORMAT_VERSION = 1
# Files of these kinds outside the checkpoint's own shards would carry stale (unfolded) weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                   ".onnx", ".onnx_data", ".npz")


@dataclass
class FoldReport:
    """What a fold or unfold wrote.

    Attributes:
        operation: ``fold`` or ``unfold``.
        out: the output directory.
        base: the checkpoint read (``default`` or a path).
        rewritten: shard files rewritten (changed tensors, or converted from pickle).
        copied: shard files copied byte for byte.
        linked: shard files hardlinked (``link=True`` on the same filesystem).
        changed_tensors: number of tensors the delta changed.
        max_cast_error: largest |cast(W +- dW) - (W +- dW)| over changed tensors (0 in fp32).
        max_cast_error_tensor: the tensor where it occurred.
        seconds: wall time.
        check_seconds: of which checking the inputs (hashes, shapes, finiteness) took.
        source_format: ``safetensors`` or ``pickle`` (then the output was converted to
            safetensors).
        skipped_files: weight-like files outside the checkpoint's shards, not copied.
        hashes_checked: whether the input tensors were checked against recorded hashes.
        restored_exact: (unfold) tensors whose recovered bytes equal the recorded base hash.
    """

    operation: str
    out: Path
    base: str
    rewritten: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    linked: list[str] = field(default_factory=list)
    changed_tensors: int = 0
    max_cast_error: float = 0.0
    max_cast_error_tensor: str | None = None
    seconds: float = 0.0
    check_seconds: float = 0.0
    source_format: str = "safetensors"
    skipped_files: list[str] = field(default_factory=list)
    hashes_checked: bool = True
    restored_exact: list[str] | None = None

    @property
    def converted_from_pickle(self) -> bool:
        return self.source_format == "pickle"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d
