"""English protection: the delta acts only where English inputs carry (almost) no energy.

Every linear map of the trained blocks sees, on English text, inputs that fill a subspace of
its input space. A change ``dW`` of the map moves English by ``dW x``; restricted to the
orthogonal complement of the English inputs (``dW <- dW P``, ``P = I - U U^T``, U spanning
the input directions that carry a share ``energy`` of the English inputs' energy), it leaves
English at the base's output up to the energy left out, while the target languages keep what
they have outside that span (the null-space constraint of AlphaEdit, Fang et al. 2025, applied
as projected training: after every optimizer step ``W <- W0 + (W - W0) P``).

The English inputs are those of the training cache (each row's English prompt and, when the
cache holds them, the base's own English reply), run once through the frozen base blocks with
hooks on every ``nn.Linear``; ``English inputs`` are the uncentered second moment
``sum x x^T`` over the non-padded positions. Norms and biases cannot be protected this way:
``train.protect_english`` requires ``train.freeze_norms``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lens_merge.lens.train.store import own_columns


@dataclass
class Projector:
    """``P = I - U U^T`` for one input space, stored as the smaller of the two bases.

    ``basis`` [in, k] spans the protected directions (``complement`` False: ``P x = x - U U^T
    x``) or, when that is smaller, the free ones (``complement`` True: ``P x = V V^T x``).
    """

    basis: torch.Tensor
    complement: bool
    rank: int  # protected directions
    energy_kept_out: float  # share of the English energy in the protected directions

    def apply(self, dw: torch.Tensor) -> torch.Tensor:
        """``dW P`` for a weight change ``dw`` [out, in]."""
        b = self.basis.to(dw.dtype)
        proj = (dw @ b) @ b.T
        return proj if self.complement else dw - proj


def projector(second_moment: torch.Tensor, energy: float) -> Projector:
    """The projector off the fewest eigen-directions of ``second_moment`` that hold at least
    ``energy`` (0..1] of its trace."""
    vals, vecs = torch.linalg.eigh(second_moment.double())
    vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
    share = torch.cumsum(vals, 0) / vals.sum().clamp_min(1e-300)
    k = int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype)).item()) + 1
    k = min(k, vals.numel())
    n = vals.numel()
    complement = k > n - k
    basis = (vecs[:, k:] if complement else vecs[:, :k]).float().contiguous()
    return Projector(basis, complement, k, float(share[k - 1]))


def english_projectors(reference: nn.Module, stack: nn.Module, batches, languages: int,
                       energy: float, device) -> dict[int, Projector]:
    """One projector per linear weight of ``stack``, from the English inputs of ``reference``.

    Args:
        reference: the frozen base copy of the stack (same module names).
        stack: the stack being trained; its linear weights are the keys (``id(weight)``).
        batches: cache batches (``DiskCache.collate`` dicts) covering the training rows.
        languages: L; a batch's ``x`` holds its rows language by language, English first.
        energy: the share of English input energy to keep out of the delta.
        device: where to run.

    Returns:
        ``{id(weight): Projector}``; linears that share an input share one projector.
    """
    linears = {name: m for name, m in reference.named_modules() if isinstance(m, nn.Linear)}
    moments: dict[str, torch.Tensor] = {}
    hooks = []
    current: dict[str, Any] = {}

    alias: dict[str, str] = {}  # q/k/v (gate/up) read one input: one moment for them

    def hook(name):
        def fn(_module, args):
            # the input is held until the pass ends, so no later tensor reuses its address
            seen, _ = current["seen"].setdefault(args[0].data_ptr(), (name, args[0]))
            if seen != name:
                alias[name] = seen
                return
            x = args[0].detach().float()
            keep = current["mask"]
            rows = x[keep] if keep is not None else x.reshape(-1, x.shape[-1])
            m = rows.T @ rows
            moments[name] = moments[name] + m if name in moments else m
        return fn

    for name, m in linears.items():
        hooks.append(m.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            for batch in batches:
                b = batch["x"].shape[0] // languages
                streams = [own_columns(batch["x"][:b], batch["mask"][:b])]
                if "x_reply" in batch:
                    streams.append((batch["x_reply"], batch["mask_reply"]))
                for x, mask in streams:
                    current["mask"], current["seen"] = mask.to(device).bool(), {}
                    reference(x.to(device), mask.to(device))
    finally:
        for h in hooks:
            h.remove()
    projs = {name: projector(mom, energy) for name, mom in moments.items()}
    trained = dict(stack.named_modules())
    return {id(trained[name].weight): projs[alias.get(name, name)]
            for name in linears if alias.get(name, name) in projs}


def project_(params: list[nn.Parameter], base: dict[int, torch.Tensor],
             projectors: dict[int, Projector]) -> None:
    """In place: ``W <- W0 + (W - W0) P`` for every parameter with a projector."""
    with torch.no_grad():
        for p in params:
            proj = projectors.get(id(p))
            if proj is not None:
                w0 = base[id(p)]
                p.copy_(w0 + proj.apply(p - w0))


def summary(projectors: dict[int, Projector]) -> dict[str, Any]:
    """What the delta's provenance records: protected rank and energy per input space."""
    seen = {id(p): p for p in projectors.values()}.values()
    return {"input_spaces": len(seen),
            "protected_rank": [p.rank for p in seen],
            "input_dim": [p.basis.shape[0] for p in seen],
            "energy_kept_out_min": min((p.energy_kept_out for p in seen), default=None)}
