"""The three Lens loss terms (lens-method.md section 2), on final hidden states.

All terms are MSE, mean over batch and hidden size:
- retain:   MSE(masked_mean(H_en^theta), masked_mean(H_en^ref))
- separate: sum_l MSE(P_s(z_l^theta) - P_s(z_l^ref), w * delta_l)
- align:    sum_l MSE(P_a(z_en^theta), P_a(z_l^theta))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from lens_merge.lens.probe import LayerSubspace


@dataclass(frozen=True)
class LossWeights:
    retain: float = 1.0
    separate: float = 1.0
    align: float = 1.0
    separate_scale: float = 1.0  # w_l, the same for every target language


def lens_losses(
    h_en: torch.Tensor,
    mask_en: torch.Tensor,
    z_en: torch.Tensor,
    z_tgt: torch.Tensor,
    ref_mean_en: torch.Tensor,
    ref_z_tgt: torch.Tensor,
    deltas: torch.Tensor,
    sub: LayerSubspace,
    w: LossWeights,
) -> dict[str, torch.Tensor]:
    """Compute every loss term and the weighted total.

    Args:
        h_en: [B, T, d] final states of the English prompts (trained model).
        mask_en: [B, T] attention mask of the English prompts.
        z_en: [B, d] final state at the last prompt token of English (trained model).
        z_tgt: [B, M, d] the same for the M target languages (trained model).
        ref_mean_en: [B, d] masked mean of the reference model's English final states.
        ref_z_tgt: [B, M, d] reference model's last-token states of the targets.
        deltas: [M, d] delta_l of each target language (last layer).
        sub: the last layer's subspace.
        w: loss weights.

    Returns:
        dict with ``retain``, ``separate``, ``align`` and ``loss`` (weighted total).
    """
    import torch.nn.functional as F

    m = mask_en.to(h_en.dtype).unsqueeze(-1)
    mean_en = (h_en * m).sum(1) / m.sum(1).clamp(min=1)
    retain = F.mse_loss(mean_en.float(), ref_mean_en.float())

    z_tgt, ref_z_tgt, z_en = z_tgt.float(), ref_z_tgt.float(), z_en.float()
    moved = sub.specific(z_tgt) - sub.specific(ref_z_tgt)  # [B, M, d]
    target = (w.separate_scale * deltas.float()).unsqueeze(0).expand_as(moved)
    # sum over languages of per-language MSE (each a mean over batch and d)
    separate = ((moved - target) ** 2).mean(dim=(0, 2)).sum()

    a_en = sub.agnostic(z_en).unsqueeze(1)  # [B, 1, d]
    a_tgt = sub.agnostic(z_tgt)  # [B, M, d]
    align = ((a_en - a_tgt) ** 2).mean(dim=(0, 2)).sum()

    total = w.retain * retain + w.separate * separate + w.align * align
    return {"loss": total, "retain": retain, "separate": separate, "align": align}
