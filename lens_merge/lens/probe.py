"""Language subspace probing (lens-method.md section 1): LSAR per layer.

For each layer, the per-language mean states W = [m_1..m_L] are decomposed into a
language-agnostic direction u and an orthonormal language-specific subspace M_s of rank r
(default L-1); each language gets a direction delta_l = P_s(m_l - m_en).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_merge.errors import DataError, DeltaError
from lens_merge.files import write_json_atomic
from lens_merge.progress import NULL, Progress
from lens_merge.provenance import canonical_hash, stamp, tool_info

if TYPE_CHECKING:
    import torch

SUBSPACE_WEIGHTS = "subspace.safetensors"
SUBSPACE_META = "subspace.json"


def lsar(means: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LSAR low-rank decomposition of per-language means.

    Args:
        means: [L, d] mean state of each language (English first).
        rank: r, the rank of the language-specific subspace (1 <= r <= L-1).

    Returns:
        (u [d], unit agnostic direction; M_s [d, r], orthonormal columns), float64.
    """
    import torch

    L = means.shape[0]
    if not 1 <= rank <= L - 1:
        raise ValueError(f"rank must be in 1..{L - 1}, got {rank}")
    W = means.double().T  # d x L
    ones = torch.ones(L, dtype=W.dtype)
    m_c = W @ ones / L
    U, S, Vh = torch.linalg.svd(W - m_c[:, None], full_matrices=False)
    W_s = U[:, :rank]
    gamma = Vh.T[:, :rank] * S[:rank]
    W_fit = m_c[:, None] + W_s @ gamma.T
    m_a = torch.linalg.pinv(W_fit).T @ ones
    m_a = m_a / m_a.dot(m_a)
    U2, _, _ = torch.linalg.svd(W_fit - m_a[:, None], full_matrices=False)
    M_s = U2[:, :rank]
    u = m_a / m_a.norm()
    return u, M_s


@dataclass
class LayerSubspace:
    """The probe of one layer."""

    u: torch.Tensor          # [d] unit agnostic direction
    M_s: torch.Tensor        # [d, r] orthonormal language-specific basis
    means: torch.Tensor      # [L, d] per-language mean states
    deltas: torch.Tensor     # [L, d] delta_l = P_s(m_l - m_en); row 0 (English) is zero

    def specific(self, x: torch.Tensor) -> torch.Tensor:
        """P_s(x) = M_s M_s^T x on the last dimension."""
        M = self.M_s.to(x.dtype)
        return (x @ M) @ M.T

    def agnostic_coord(self, x: torch.Tensor) -> torch.Tensor:
        """u . x on the last dimension (P_a(x) = (u . x) u)."""
        return x @ self.u.to(x.dtype)

    def agnostic(self, x: torch.Tensor) -> torch.Tensor:
        return self.agnostic_coord(x).unsqueeze(-1) * self.u.to(x.dtype)


@dataclass
class Subspace:
    """Probe results at every layer, with provenance."""

    languages: list[str]
    layers: list[LayerSubspace]
    meta: dict[str, Any] = field(default_factory=dict)

    def layer(self, k: int = -1) -> LayerSubspace:
        return self.layers[k]

    def delta_of(self, lang: str, k: int = -1) -> torch.Tensor:
        return self.layers[k].deltas[self.languages.index(lang)]

    def save(self, out_dir: str | Path) -> Path:
        """Write ``subspace.safetensors`` and ``subspace.json`` (json written last)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for k, ly in enumerate(self.layers):
            tensors[f"layer.{k}.u"] = ly.u.float().contiguous()
            tensors[f"layer.{k}.M_s"] = ly.M_s.float().contiguous()
            tensors[f"layer.{k}.means"] = ly.means.float().contiguous()
            tensors[f"layer.{k}.deltas"] = ly.deltas.float().contiguous()
        save_file(tensors, str(out / SUBSPACE_WEIGHTS))
        from lens_merge.files import file_sha256

        self.meta["weights_sha256"] = file_sha256(out / SUBSPACE_WEIGHTS)
        write_json_atomic(out / SUBSPACE_META, self.meta)
        return out

    @property
    def sha256(self) -> str:
        return self.meta.get("weights_sha256", "")

    @classmethod
    def load(cls, path: str | Path) -> Subspace:
        from safetensors.torch import load_file

        p = Path(path)
        if not (p / SUBSPACE_META).is_file() or not (p / SUBSPACE_WEIGHTS).is_file():
            raise DeltaError(f"{p}: not a probe output (expected {SUBSPACE_META} and "
                             f"{SUBSPACE_WEIGHTS})")
        meta = json.loads((p / SUBSPACE_META).read_text())
        t = load_file(str(p / SUBSPACE_WEIGHTS))
        layers = [LayerSubspace(t[f"layer.{k}.u"].double(), t[f"layer.{k}.M_s"].double(),
                                t[f"layer.{k}.means"], t[f"layer.{k}.deltas"])
                  for k in range(meta["num_layers"])]
        return cls(list(meta["languages"]), layers, meta)


def fit_layers(means: torch.Tensor, languages: list[str], rank: int) -> list[LayerSubspace]:
    """LSAR at every layer. ``means`` is [n_layers, L, d]."""
    out = []
    for k in range(means.shape[0]):
        u, M_s = lsar(means[k], rank)
        m = means[k].double()
        deltas = ((m - m[0]) @ M_s) @ M_s.T
        out.append(LayerSubspace(u, M_s, means[k].float(), deltas.float()))
    return out


def probe(
    model,
    tokenizer,
    texts: dict[str, list[str]],
    pooling: str = "last",
    rank: int | None = None,
    max_length: int = 128,
    batch_size: int = 16,
    chat_template: bool = True,
    meta: dict[str, Any] | None = None,
    progress: Progress = NULL,
    precomputed: dict[str, torch.Tensor] | None = None,
    dtype: str | None = "fp32",
    device: str = "cpu",
) -> Subspace:
    """Probe a model: per-language mean states at every layer, then LSAR per layer.

    Args:
        model: the model directory (str or Path: streamed one block at a time, never loaded
            whole; see ``lens_merge.lens.stream``), or a loaded causal LM (one full forward
            per batch).
        tokenizer: its tokenizer.
        texts: probing texts per language, English first (need not be parallel).
        pooling: ``last`` (generation-prompt token, left padded) or ``mean`` (masked mean).
        rank: r; default L-1.
        max_length, batch_size, chat_template: see ``lens_merge.lens.hidden``.
        meta: extra provenance merged into the result's json (model reference, config hash).
        precomputed: pooled states ``[n_layers, len(texts[lang]), d]`` of some languages'
            texts, taken from another forward pass over the same prompts (the training cache
            pass); the other languages are run here.
        dtype, device: compute dtype and device of a streamed model (ignored for a loaded
            one).

    Returns:
        The fitted ``Subspace``.
    """
    import torch

    from lens_merge.lens.hidden import pooled_states
    from lens_merge.lens.stream import pooled_layer_states

    languages = list(texts)
    if not languages or languages[0] != "en":
        raise DataError("probe: English ('en') must be the first language")
    r = rank if rank is not None else len(languages) - 1
    for lang in languages:
        if not texts[lang]:
            raise DataError(f"probe: no texts for language {lang!r}")
    states_of = dict(precomputed or {})
    todo = {lang: texts[lang] for lang in languages if lang not in states_of}
    if todo and isinstance(model, (str, Path)):  # every language in one streamed pass
        states_of.update(pooled_layer_states(model, tokenizer, todo, pooling, max_length,
                                             batch_size, chat_template, dtype, device,
                                             progress))
    means, counts = [], {}
    for lang in languages:
        states = states_of.get(lang)
        if states is None:
            states = pooled_states(model, tokenizer, texts[lang], pooling, max_length,
                                   batch_size, chat_template, progress,
                                   description=f"probe {lang}")
        elif lang in (precomputed or {}) and tuple(states.shape[1:2]) != (len(texts[lang]),):
            raise DataError(f"probe: precomputed states of {lang!r} hold {states.shape[1]} "
                            f"texts, expected {len(texts[lang])}")
        means.append(states.mean(1))  # [n_layers, d]
        counts[lang] = len(texts[lang])
    W = torch.stack(means, 1)  # [n_layers, L, d]
    layers = fit_layers(W, languages, r)
    m = dict(meta or {})
    m.update({
        "format": "lens-subspace", "format_version": 1, "languages": languages,
        "sample_counts": counts, "pooling": pooling, "rank": r,
        "num_layers": len(layers), "hidden_size": int(W.shape[-1]),
        "layers": "hidden_states[1:]; the last layer is after the final norm",
        "max_length": max_length, "chat_template": chat_template,
        "texts_sha256": canonical_hash(texts),
        "shared_pass": sorted(precomputed or {}), **stamp(), "tool": tool_info(),
    })
    return Subspace(languages, layers, m)
