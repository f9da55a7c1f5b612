"""Running only the top K blocks (plus the final norm) of a transformers causal LM.

``TopStack`` temporarily replaces the decoder's block list with its top K blocks and feeds the
cached residual stream as ``inputs_embeds``; the modules are the model's own (no copy), so
training them trains the model. ``restore()`` puts the full block list back.
"""

from __future__ import annotations

import torch
from torch import nn

from lens_merge.architectures import Architecture
from lens_merge.lens.hidden import position_ids


class TopStack(nn.Module):
    """The top K decoder blocks and the final norm of ``model``, fed from the cache."""

    def __init__(self, model, arch: Architecture, top_k: int) -> None:
        super().__init__()
        for p in model.parameters():
            p.requires_grad_(False)
        self.decoder = model.base_model
        # a plain tuple, not a registered submodule: the lower blocks are not part of this stack
        self._full: tuple[nn.ModuleList] = (self.decoder.layers,)
        n = len(self.decoder.layers)
        self.first_block = n - top_k
        self.decoder.layers = nn.ModuleList(list(self._full[0])[self.first_block:])
        for p in self.decoder.layers.parameters():
            p.requires_grad_(True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final (normed) states [B, T, d] from block-(N-K) inputs ``x`` [B, T, d]."""
        out = self.decoder(inputs_embeds=x, attention_mask=mask, position_ids=position_ids(mask),
                           use_cache=False)
        return out.last_hidden_state

    def restore(self) -> None:
        """Put the full block list back into the decoder."""
        self.decoder.layers = self._full[0]
