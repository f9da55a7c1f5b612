"""Low-rank factors of a Lens delta: one truncated SVD per linear weight (fp32 math).

Shared by the PEFT LoRA exporter (``adapters.peft_lora``) and the llama.cpp LoRA GGUF exporter.

API (stable)::

    factor_delta(delta: LensDelta, rank: int | None = None, energy: float | None = None, *,
                 arch: Architecture | None = None) -> Factorization

- ``rank=R``: every linear weight gets rank R; R larger than min(out, in) of a tensor is an
  ``AdapterError`` naming the tensor and its shape. ``energy=E`` (0 < E <= 1): each tensor gets
  the smallest rank whose squared singular values keep the fraction E of the total
  (at least 1). Neither: full rank, min(out, in) (exact up to fp32 rounding). Both: error.
- ``arch``: the weight-name table; default: ``architectures.get(meta["base"]["architecture"])``
  or ``for_config({"model_type": meta["base"]["model_type"]})``; without either, a tensor is a
  linear weight when it is 2-D and named ``*.weight``.
- A delta touching the embeddings or lm_head raises ``AdapterError`` naming them.

``Factorization``:
    factors: dict[str, TensorFactor]  base tensor name -> factor, in the delta's order
    dropped: dict[str, DroppedTensor] tensors that are not linear weights (norms, biases)
    meta: dict                        the delta's ``lens_delta.json`` fields (base hashes)
    rank, energy                      the request
    max_rank (property)               largest per-tensor rank
    blocks (property)                 sorted decoder block ids of the factors
    nbytes(dtype_bytes=4)             bytes of every A and B at that element size
    records() -> dict                 JSON-ready per-tensor rows (rank, rel_error, ...)

``TensorFactor`` (frozen): ``name`` (HF base tensor, ``model.layers.7.self_attn.q_proj.weight``),
``module`` (its module path, ``model.layers.7.self_attn.q_proj``), ``suffix`` (the name inside
the block, ``self_attn.q_proj.weight``; the table's key), ``block`` (int or None), ``shape``
(out, in), ``rank``, ``A`` (fp32 [rank, in]), ``B`` (fp32 [out, rank]), ``rel_error``
(||dW - B @ A||_F / ||dW||_F, measured; 0.0 for a zero dW), ``energy`` (kept fraction of the
squared singular values), ``norm`` (||dW||_F). dW ~= B @ A with scale 1: the singular values
are split evenly (A = sqrt(S) Vh, B = U sqrt(S)), so an adapter format whose update is
``alpha / r * B @ A`` needs alpha = r per tensor (PEFT: ``alpha_pattern``; llama.cpp:
``adapter.lora.alpha`` = 0 means scale 1, or fold the scale into B).

``DroppedTensor`` (frozen): ``name``, ``shape``, ``norm`` (||dW||_F), ``reason``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lens_merge.errors import AdapterError, ModelError

if TYPE_CHECKING:
    import torch

    from lens_merge.architectures import Architecture
    from lens_merge.weights.delta import LensDelta

DEFAULT_ENERGY = 0.9  # the CLI's and recipe's default kept energy fraction


@dataclass(frozen=True)
class TensorFactor:
    """dW ~= B @ A for one linear weight of the delta."""

    name: str
    module: str
    suffix: str
    block: int | None
    shape: tuple[int, int]
    rank: int
    A: torch.Tensor
    B: torch.Tensor
    rel_error: float
    energy: float
    norm: float

    @property
    def full_rank(self) -> int:
        return min(self.shape)


@dataclass(frozen=True)
class DroppedTensor:
    """A delta tensor no LoRA pair can carry (a norm's scale, a bias)."""

    name: str
    shape: tuple[int, ...]
    norm: float
    reason: str


@dataclass
class Factorization:
    """Every factor of one delta, the tensors left out, and the request that chose the ranks."""

    factors: dict[str, TensorFactor]
    dropped: dict[str, DroppedTensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None
    energy: float | None = None

    @property
    def max_rank(self) -> int:
        return max((f.rank for f in self.factors.values()), default=0)

    @property
    def blocks(self) -> list[int]:
        return sorted({f.block for f in self.factors.values() if f.block is not None})

    def nbytes(self, dtype_bytes: int = 4) -> int:
        """Bytes of every A and B stored at ``dtype_bytes`` per element."""
        return sum((f.A.numel() + f.B.numel()) * dtype_bytes for f in self.factors.values())

    def records(self) -> dict[str, Any]:
        """JSON-ready rows: per tensor rank, shape, rel_error, energy, norm; dropped tensors."""
        return {
            "rank": self.rank, "energy": self.energy, "max_rank": self.max_rank,
            "tensors": {n: {"module": f.module, "shape": list(f.shape), "rank": f.rank,
                            "full_rank": f.full_rank, "rel_error": f.rel_error,
                            "energy": f.energy, "norm": f.norm}
                        for n, f in self.factors.items()},
            "dropped": {n: {"shape": list(d.shape), "norm": d.norm, "reason": d.reason}
                        for n, d in self.dropped.items()},
        }


def arch_of_delta(delta: LensDelta) -> Architecture | None:
    """The weight-name table the delta's base records (None when it records none)."""
    from lens_merge import architectures

    base = delta.meta.get("base") or {}
    try:
        if base.get("architecture"):
            return architectures.get(str(base["architecture"]))
        if base.get("model_type"):
            return architectures.for_config({"model_type": base["model_type"]})
    except ModelError as exc:
        raise AdapterError(f"delta {delta.path or ''}: {exc}".replace(" : ", ": ")) from None
    return None


def _classify(name: str, shape: tuple[int, ...], arch: Architecture | None) -> tuple[str, str]:
    """(``linear`` | ``dropped`` | ``global``, the name inside its block or a reason)."""
    if arch is not None:
        if name in (arch.embed, arch.lm_head) or name in arch.global_tensors:
            return "global", name
        bid = arch.block_of(name)
        suffix = name[len(arch.block_prefix.format(bid=bid)):] if bid is not None else name
    else:
        if "embed_tokens" in name or name.startswith("lm_head") or ".wte." in name:
            return "global", name
        m = re.match(r".*?\.layers\.\d+\.", name)
        bid, suffix = None, (name[m.end():] if m else name)
    if len(shape) != 2:
        kind = "bias" if name.endswith(".bias") else "norm" if "norm" in name else \
            f"{len(shape)}-D tensor"
        return "dropped", f"{kind}: not a linear weight, no LoRA pair can carry it"
    if not name.endswith(".weight"):
        return "dropped", "2-D tensor not named *.weight: not a linear weight"
    if arch is not None and suffix not in arch.block_tensors:
        return "dropped", f"not in the {arch.name} table's block tensors"
    return "linear", suffix


def _block_of(name: str) -> int | None:
    m = re.match(r".*?\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _choose_rank(s: torch.Tensor, name: str, shape: tuple[int, int], rank: int | None,
                 energy: float | None) -> int:
    import torch

    full = min(shape)
    if rank is not None:
        if rank > full:
            raise AdapterError(f"rank {rank} is larger than tensor {name} of shape "
                               f"{list(shape)} allows (at most {full})")
        return rank
    if energy is None:
        return full
    sq = s.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(sq, 0) / total
    r = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype))) + 1
    return max(1, min(r, full))


def factor_tensor(name: str, dw: torch.Tensor, rank: int | None = None,
                  energy: float | None = None) -> tuple[torch.Tensor, torch.Tensor, int, float,
                                                        float]:
    """Truncated SVD of one 2-D dW in fp32: (A [r, in], B [out, r], r, rel_error, energy kept).

    Raises:
        AdapterError: rank larger than min(out, in), naming the tensor and its shape.
    """
    import torch

    w = dw.detach().to(torch.float32).cpu()
    shape = (int(w.shape[0]), int(w.shape[1]))
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    r = _choose_rank(S, name, shape, rank, energy)
    root = S[:r].sqrt()
    A = (root[:, None] * Vh[:r]).contiguous()
    B = (U[:, :r] * root[None, :]).contiguous()
    norm = float(w.norm())
    rel = float((w - B @ A).norm()) / norm if norm > 0 else 0.0
    sq = S.double() ** 2
    kept = float(sq[:r].sum() / sq.sum()) if float(sq.sum()) > 0 else 1.0
    return A, B, r, rel, kept


def factor_delta(delta: LensDelta, rank: int | None = None, energy: float | None = None, *,
                 arch: Architecture | None = None) -> Factorization:
    """Factor every linear weight of ``delta`` as B @ A (see the module docstring).

    Args:
        delta: the Lens delta.
        rank: one rank for every linear weight.
        energy: kept fraction of squared singular values, per tensor (0 < E <= 1).
        arch: the weight-name table (default: the one the delta's base records).

    Returns:
        The ``Factorization``.

    Raises:
        AdapterError: both or an invalid ``rank``/``energy``, a rank larger than a tensor
            allows, a delta touching embeddings or lm_head, or no linear weight at all.
    """
    if rank is not None and energy is not None:
        raise AdapterError("give a rank or an energy fraction, not both")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise AdapterError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None and not (0.0 < float(energy) <= 1.0):
        raise AdapterError(f"energy must be in (0, 1], got {energy!r}")
    arch = arch if arch is not None else arch_of_delta(delta)
    where = f"delta {delta.path}" if delta.path else "the delta"
    kinds = {n: _classify(n, tuple(t.shape), arch) for n, t in delta.tensors.items()}
    glob = [n for n, (k, _) in kinds.items() if k == "global"]
    if glob:
        raise AdapterError(f"{where} changes {', '.join(glob)} (embeddings / lm_head): a LoRA "
                           "adapter of the decoder blocks cannot carry them; export the folded "
                           "checkpoint instead")
    factors: dict[str, TensorFactor] = {}
    dropped: dict[str, DroppedTensor] = {}
    for name, t in delta.tensors.items():
        kind, info = kinds[name]
        if kind == "dropped":
            dropped[name] = DroppedTensor(name, tuple(int(x) for x in t.shape),
                                          float(t.float().norm()), info)
            continue
        A, B, r, rel, kept = factor_tensor(name, t, rank, energy)
        block = arch.block_of(name) if arch is not None else _block_of(name)
        factors[name] = TensorFactor(
            name=name, module=name[: -len(".weight")], suffix=info, block=block,
            shape=(int(t.shape[0]), int(t.shape[1])), rank=r, A=A, B=B, rel_error=rel,
            energy=kept, norm=float(t.float().norm()))
    if not factors:
        raise AdapterError(f"{where} holds no linear weight to factor (only "
                           f"{', '.join(dropped) or 'nothing'})")
    return Factorization(factors=factors, dropped=dropped, meta=dict(delta.meta), rank=rank,
                         energy=None if energy is None else float(energy))
