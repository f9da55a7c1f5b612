"""The Lens delta: the trained change of the top blocks, dW = W_trained - W_base (fp32).

On disk a delta is a directory with ``lens_delta.safetensors`` (only the changed tensors,
named as in the base checkpoint) and ``lens_delta.json`` (format version, tool version, base
reference and the sha256 of every base tensor it changes, languages, K, loss weights,
hyperparameters, final losses, subspace hash and the measured effect).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_merge.errors import DeltaError, RecordError
from lens_merge.files import atomic_dir, write_json_atomic
from lens_merge.provenance import build_time, tool_info

if TYPE_CHECKING:
    import torch

DELTA_WEIGHTS = "lens_delta.safetensors"
DELTA_META = "lens_delta.json"
FORMAT = "lens-delta"
FORMAT_VERSION = 1
FLOAT_DTYPES = ("F32", "F64", "F16", "BF16")  # stored dtypes a delta may have (read as fp32)


@dataclass
class LensDelta:
    """A set of fp32 weight differences keyed by base tensor name, plus provenance."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the directory it was loaded from or saved to

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
            DeltaError: when ``out_dir`` exists (a dangling symlink included) and
                ``overwrite`` is False, or a tensor is not finite.
        """
        import torch

        from lens_merge.weights.shard_writer import save_safetensors

        out = Path(out_dir)
        if (out.exists() or out.is_symlink()) and not overwrite:
            raise DeltaError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
        for n, t in self.tensors.items():
            if not torch.isfinite(t).all():
                raise DeltaError(f"delta tensor {n} holds NaN or Inf; refusing to write it")
        meta = dict(self.meta)
        meta.setdefault("format", FORMAT)
        meta.setdefault("format_version", FORMAT_VERSION)
        meta.setdefault("tool", tool_info())
        if build_time():
            meta.setdefault("created", build_time())
        with atomic_dir(out, overwrite=True) as tmp:
            tensors = {n: t.detach().to(torch.float32).contiguous().cpu()
                       for n, t in self.tensors.items()}
            save_safetensors(tmp / DELTA_WEIGHTS, tensors,
                             {"format": FORMAT, "format_version": str(FORMAT_VERSION)})
            write_json_atomic(tmp / DELTA_META, meta)
        self.meta, self.path = meta, out
        return out

    @classmethod
    def load(cls, path: str | Path) -> LensDelta:
        """Read a delta directory (or the path of its ``lens_delta.json``), checking it.

        ``lens_delta.json`` is validated as a ``records.DeltaMeta``; the safetensors header of
        ``lens_delta.safetensors`` is checked against the file (size, offsets, dtypes); both
        must name the same tensors with the same shapes, and every value must be finite.

        Raises:
            DeltaError: one line naming the file and what is wrong with it.
        """
        p = Path(path)
        if p.is_file() and p.name == DELTA_META:
            p = p.parent
        meta_path, w_path = p / DELTA_META, p / DELTA_WEIGHTS
        if not meta_path.is_file() or not w_path.is_file():
            raise DeltaError(f"{p}: not a Lens delta (expected {DELTA_META} and {DELTA_WEIGHTS})")
        meta = read_meta(meta_path)
        tensors = _load_tensors(w_path, meta)
        return cls(tensors=tensors, meta=meta, path=p)

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


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read and validate ``lens_delta.json`` (a ``records.DeltaMeta``).

    Returns:
        The file's fields as a dict (values as validated; keys absent in the file stay absent).

    Raises:
        DeltaError: naming the file and the field at fault; a newer ``format_version`` asks
            for an upgrade.
    """
    from lens_merge.records import DeltaMeta, read_json, validate_record

    try:
        raw = read_json(path)
        if isinstance(raw, dict):
            version = raw.get("format_version")
            if raw.get("format") != FORMAT:
                raise DeltaError(f"{path}: field 'format' is {raw.get('format')!r}, expected "
                                 f"{FORMAT!r}")
            if (isinstance(version, int) and not isinstance(version, bool)
                    and version > FORMAT_VERSION):
                raise DeltaError(f"{path}: format_version {version} is newer than this "
                                 f"lens-merge understands ({FORMAT_VERSION}); upgrade")
        rec = validate_record(raw, DeltaMeta, path)
    except RecordError as exc:
        raise DeltaError(str(exc)) from None
    try:
        return rec.model_dump(mode="json", exclude_unset=True)
    except ValueError:  # pydantic's serializer refuses values nested beyond its depth limit
        raise DeltaError(f"{path}: values nested too deeply") from None


def _load_tensors(w_path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The delta's tensors (fp32), checked against the file and against ``meta``."""
    import torch
    from safetensors import safe_open

    from lens_merge.weights.checkpoint import shard_entries

    entries = shard_entries(w_path, DeltaError)
    recorded = meta["tensors"]
    if set(recorded) != set(entries):
        diff = sorted(set(entries) ^ set(recorded))[:5]
        raise DeltaError(f"{w_path.parent}: {DELTA_META} and {DELTA_WEIGHTS} disagree on tensor "
                         f"names (e.g. {diff})")
    for name, e in entries.items():
        if e.dtype not in FLOAT_DTYPES:
            raise DeltaError(f"{w_path}: tensor {name} is {e.dtype}, expected a float dtype "
                             f"({', '.join(FLOAT_DTYPES)})")
        if list(e.shape) != list(recorded[name]["shape"]):
            raise DeltaError(f"{w_path}: tensor {name} has shape {list(e.shape)}, "
                             f"{DELTA_META} records {recorded[name]['shape']}")
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(w_path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[name] = fh.get_tensor(name).to(torch.float32)
    except Exception as exc:  # noqa: BLE001 - the reader's own errors, after our checks
        raise DeltaError(f"{w_path}: cannot be read ({type(exc).__name__}: {exc})") from None
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise DeltaError(f"{w_path}: tensor {name} holds NaN or Inf")
    return tensors


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
