"""The Lens loss terms (lens-method.md section 2), on final hidden states.

All state terms are MSE, mean over batch and hidden size:
- retain:      MSE(masked_mean(H_en^theta), masked_mean(H_en^ref))
- separate:    sum_l MSE(P_s(z_l^theta) - P_s(z_l^ref), w * delta_l)
- align:       sum_l MSE(P_a(a), P_a(z_l^theta)), a = z_en^theta (the paper) or z_en^ref
               (``align_anchor="reference"``: align then cannot move English)
- retain_last: MSE(z_en^theta, z_en^ref), the state English replies are generated from
- kl:          KL(base || lens) of the next-token distribution at the last English prompt
               token, mean over the batch (nats), through the frozen final norm and head
- kl_tokens:   the same KL at every English prompt token (mean over tokens)
- kl_replies:  the same KL at every position of the base's own greedy English replies
               (teacher-forced), mean over positions

A term whose weight is 0 is still returned (for the log) but never enters the total, so its
gradient is not computed: with ``retain_last = kl = 0`` and ``align_anchor="trained"`` the
total and its gradients are those of the paper's three terms bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

    from lens_merge.lens.probe import LayerSubspace

AlignAnchor = Literal["trained", "reference"]


@dataclass(frozen=True)
class LossWeights:
    retain: float = 1.0
    separate: float = 1.0
    align: float = 1.0
    separate_scale: float = 1.0  # w_l, the same for every target language
    retain_last: float = 0.0
    kl: float = 0.0
    kl_tokens: float = 0.0
    align_anchor: AlignAnchor = "trained"
    kl_replies: float = 0.0


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
    ref_z_en: torch.Tensor | None = None,
    logp_en: torch.Tensor | None = None,
    ref_logp_en: torch.Tensor | None = None,
    logp_tokens: torch.Tensor | None = None,
    ref_logp_tokens: torch.Tensor | None = None,
    logp_replies: torch.Tensor | None = None,
    ref_logp_replies: torch.Tensor | None = None,
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
        ref_z_en: [B, d] reference model's last-token English state; needed for
            ``retain_last`` and ``align_anchor="reference"`` (None: those terms are absent).
        logp_en: [B, V] the trained model's next-token log-probabilities at the last English
            token; with ``ref_logp_en`` (the base's) gives ``kl`` (None: absent).
        ref_logp_en: [B, V] the base's log-probabilities there.
        logp_tokens, ref_logp_tokens: [B, T, V] the trained model's and the base's
            log-probabilities at every English token; with both, ``kl_tokens`` (the KL
            averaged over the tokens ``mask_en`` marks; None: absent).
        logp_replies, ref_logp_replies: [n, V] the trained model's and the base's
            log-probabilities at the n positions that produced the base's English replies;
            with both, ``kl_replies`` (mean over the positions; None: absent).

    Returns:
        dict with ``retain``, ``separate``, ``align``, ``retain_last`` and ``kl`` when their
        inputs are given, and ``loss`` (the weighted total).

    Raises:
        ValueError: when a term with a non-zero weight lacks its inputs.
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

    if w.align_anchor == "reference":
        if ref_z_en is None:
            raise ValueError("align_anchor='reference' needs ref_z_en (the cached English "
                             "last-token state)")
        anchor = ref_z_en.float()
    else:
        anchor = z_en
    a_en = sub.agnostic(anchor).unsqueeze(1)  # [B, 1, d]
    a_tgt = sub.agnostic(z_tgt)  # [B, M, d]
    align = ((a_en - a_tgt) ** 2).mean(dim=(0, 2)).sum()

    total = w.retain * retain + w.separate * separate + w.align * align
    out = {"retain": retain, "separate": separate, "align": align}
    if ref_z_en is not None:
        out["retain_last"] = F.mse_loss(z_en, ref_z_en.float())
    if logp_en is not None and ref_logp_en is not None:
        out["kl"] = F.kl_div(logp_en.float(), ref_logp_en.float(), log_target=True,
                             reduction="batchmean")
    if logp_tokens is not None and ref_logp_tokens is not None:
        per = F.kl_div(logp_tokens.float(), ref_logp_tokens.float(), log_target=True,
                       reduction="none").sum(-1)  # [B, T]
        keep = mask_en.to(per.dtype)
        out["kl_tokens"] = (per * keep).sum() / keep.sum().clamp(min=1)
    if logp_replies is not None and ref_logp_replies is not None:
        out["kl_replies"] = F.kl_div(logp_replies.float(), ref_logp_replies.float(),
                                     log_target=True, reduction="batchmean")
    for name in ("retain_last", "kl", "kl_tokens", "kl_replies"):
        weight = getattr(w, name)
        if weight:
            if name not in out:
                raise ValueError(f"loss weight {name}={weight} but its inputs are missing")
            total = total + weight * out[name]
    return {"loss": total, **out}
