"""The reference-style Lens step: full forward of the trained model and of a frozen copy.

Kept as the ground truth for the cached trainer (tests compare loss and gradients) and as the
baseline of ``tools/bench_train.py``. Not used for training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lens_merge.lens.hidden import encode, pool
from lens_merge.lens.train.losses import LossWeights, lens_losses

if TYPE_CHECKING:
    import torch

    from lens_merge.lens.probe import Subspace


def naive_losses(
    model,
    ref_model,
    tokenizer,
    rows: list[dict[str, str]],
    languages: list[str],
    subspace: Subspace,
    weights: LossWeights,
    max_length: int,
    chat_template: bool = True,
) -> dict[str, torch.Tensor]:
    """Lens losses for parallel ``rows`` with two full forwards (trained and reference).

    The KL term comes from the two models' own next-token logits at the last English token
    (the whole model's forward: its head, tied or not, and any logit soft cap).
    """
    import torch

    def final(m, lang, grad, logits=False):
        enc = encode(tokenizer, [r[lang] for r in rows], max_length, chat_template)
        with torch.set_grad_enabled(grad):
            out = m(**enc, output_hidden_states=True, use_cache=False,
                        logits_to_keep=1)
        if logits:
            return out.hidden_states[-1], enc["attention_mask"], out.logits[:, -1].float()
        return out.hidden_states[-1], enc["attention_mask"]

    sub = subspace.layer(-1)
    h_en, mask_en, logits_en = final(model, languages[0], True, logits=True)
    ref_en, _, ref_logits_en = final(ref_model, languages[0], False, logits=True)
    z_t, ref_t = [], []
    for lang in languages[1:]:
        h, mask = final(model, lang, True)
        r, _ = final(ref_model, lang, False)
        z_t.append(pool(h, mask, "last"))
        ref_t.append(pool(r, mask, "last"))
    deltas = torch.stack([subspace.delta_of(lang) for lang in languages[1:]])
    return lens_losses(h_en, mask_en, pool(h_en, mask_en, "last"), torch.stack(z_t, 1),
                       pool(ref_en, mask_en, "mean"), torch.stack(ref_t, 1), deltas, sub,
                       weights, ref_z_en=pool(ref_en, mask_en, "last"),
                       logp_en=torch.log_softmax(logits_en, -1),
                       ref_logp_en=torch.log_softmax(ref_logits_en, -1))
