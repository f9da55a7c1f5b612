"""The Lens delta: the trained change of the top blocks, dW = W_trained - W_base (fp32).

On disk a delta is a directory with ``lens_delta.safetensors`` (only the changed tensors,
named as in the base checkpoint) and ``lens_delta.json`` (format version, tool version, base
reference and the sha256 of every base tensor it changes, languages, K, loss weights,
hyperparameters, final losses, subspace hash and the measured effect).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_merge.errors import DeltaError
from lens_merge.provenance import now_iso, ordinary_permissions, tool_info, write_json_atomic

if TYPE_CHECKING:
    import torch

DELTA_WEIGHTS = "lens_delta.safetensors"
DELTA_META = "lens_delta.json"
FORMAT = "lens-delta"
FORMAT_VERSION = 1


@dataclass
class LensDelta:
    """A set of fp32 weight differences keyed by base tensor name, plus provenance."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Names of the base tensors this delta changes."""
        return list(self.tensors)

    def delta_for(self, name: str) -> torch.Tensor | None:
        """dW for base tensor ``name`` (fp32), or None when the delta leaves it unchanged."""
        return self.tensors.get(name)

    def base_hash(self, name: str) -> str:
        """Recorded sha256 of the stored bytes of base tensor ``name``."""
        try:
            return self.meta["tensors"][name]["base_sha256"]
        except KeyError as exc:
            raise DeltaError(f"delta records no base hash for tensor {name!r}") from exc

    @property
    def languages(self) -> list[str]:
        return list(self.meta.get("languages", []))

    def save(self, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Write the delta directory atomically (temporary sibling, then rename).

        Raises:
            DeltaError: when ``out_dir`` exists and ``overwrite`` is False, or a tensor is
                not finite.
        """
        import torch
        from safetensors.torch import save_file

        out = Path(out_dir)
        if out.exists() and not overwrite:
            raise DeltaError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
        for n, t in self.tensors.items():
            if not torch.isfinite(t).all():
                raise DeltaError(f"delta tensor {n} holds NaN or Inf; refusing to write it")
        meta = dict(self.meta)
        meta.setdefault("format", FORMAT)
        meta.setdefault("format_version", FORMAT_VERSION)
        meta.setdefault("tool", tool_info())
        meta.setdefault("created", now_iso())
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            tensors = {n: t.detach().to(torch.float32).contiguous().cpu()
                       for n, t in self.tensors.items()}
            save_file(tensors, str(tmp / DELTA_WEIGHTS),
                      metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
            write_json_atomic(tmp / DELTA_META, meta)
            ordinary_permissions(tmp)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.meta = meta
        return out

    @classmethod
    def load(cls, path: str | Path) -> LensDelta:
        """Read a delta directory (or the path of its ``lens_delta.json``).

        Raises:
            DeltaError: naming the file and what is wrong with it.
        """
        from safetensors.torch import load_file

        p = Path(path)
        if p.is_file() and p.name == DELTA_META:
            p = p.parent
        meta_path, w_path = p / DELTA_META, p / DELTA_WEIGHTS
        if not meta_path.is_file() or not w_path.is_file():
            raise DeltaError(f"{p}: not a Lens delta (expected {DELTA_META} and {DELTA_WEIGHTS})")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise DeltaError(f"{meta_path}: invalid JSON ({exc})") from exc
        if meta.get("format") != FORMAT:
            raise DeltaError(f"{meta_path}: field 'format' is {meta.get('format')!r}, "
                             f"expected {FORMAT!r}")
        if int(meta.get("format_version", -1)) > FORMAT_VERSION:
            raise DeltaError(f"{meta_path}: format_version {meta['format_version']} is newer "
                             f"than this lens-merge understands ({FORMAT_VERSION}); upgrade")
        tensors = load_file(str(w_path))
        recorded = set(meta.get("tensors", {}))
        if recorded != set(tensors):
            missing = sorted(set(tensors) ^ recorded)[:5]
            raise DeltaError(f"{p}: {DELTA_META} and {DELTA_WEIGHTS} disagree on tensor names "
                             f"(e.g. {missing})")
        return cls(tensors=tensors, meta=meta)

    @classmethod
    def from_weights(
        cls,
        base: dict[str, torch.Tensor],
        trained: dict[str, torch.Tensor],
        base_hashes: dict[str, str],
        meta: dict[str, Any] | None = None,
    ) -> LensDelta:
        """Build dW = trained - base in fp32 for every tensor named in ``trained``.

        Args:
            base: base tensors (any float dtype, as stored).
            trained: trained tensors with the same names and shapes.
            base_hashes: sha256 of each base tensor's stored bytes.
            meta: provenance fields merged into the delta's json.
        """

        tensors: dict[str, torch.Tensor] = {}
        records: dict[str, dict] = {}
        for name, w in trained.items():
            if name not in base:
                raise DeltaError(f"trained tensor {name!r} has no base counterpart")
            b = base[name]
            if tuple(b.shape) != tuple(w.shape):
                raise DeltaError(f"tensor {name}: base shape {tuple(b.shape)} != trained "
                                 f"shape {tuple(w.shape)}")
            tensors[name] = w.detach().float().cpu() - b.detach().float().cpu()
            records[name] = {"shape": list(b.shape), "base_dtype": str(b.dtype).split(".")[-1],
                             "base_sha256": base_hashes[name]}
        m = dict(meta or {})
        m["tensors"] = records
        return cls(tensors=tensors, meta=m)

    def norms(self) -> dict[str, float]:
        """Frobenius norm of each dW (handy for reports)."""
        return {n: float(t.norm()) for n, t in self.tensors.items()}


def apply_delta(model, delta: LensDelta, sign: float = 1.0) -> None:
    """Add ``sign * dW`` to a loaded model's parameters in place (fp32 compute, cast back).

    Args:
        model: a transformers model whose ``state_dict`` names match the delta.
        delta: the Lens delta.
        sign: +1 to apply, -1 to remove.

    Raises:
        DeltaError: when a delta tensor has no parameter of that name or shape.
    """
    import torch

    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name, d in delta.tensors.items():
            p = params.get(name)
            if p is None:
                raise DeltaError(f"delta tensor {name!r} is not a parameter of the model")
            if tuple(p.shape) != tuple(d.shape):
                raise DeltaError(f"delta tensor {name}: shape {tuple(d.shape)} != model "
                                 f"parameter shape {tuple(p.shape)}")
            p.copy_((p.float() + sign * d.to(p.device)).to(p.dtype))
