"""One batch of prompts on its way up the frozen blocks (``lens_merge.lens.stream``).

Prompts made with a chat template start with the same tokens (SmolLM2's system prompt and
``<|im_start|>user``: 24 of its 42 tokens for an average English training prompt). Those
tokens' states are the same in every row, so ``Rows`` runs them once, as a batch of one, and
each row's own tokens after them with the shared part as a KV cache:

    rows [pad pad S S S a b]       shared S S S (batch 1)   ->  its keys/values
         [pad S S S c d e f]   ->  own  [pad pad a b]        ->  attend to S S S + their own
         [S S S g h i j k l]           [c d e f ...]

Positions are the same as in the whole rows (the shared part is 0..P-1 everywhere; left
padding is not counted), the mask of the own tokens is the model's mask over the whole
sequence with its first P query rows dropped, and ``hidden`` reassembles the rows in the
batch's own left-padded layout for the visitor, so a consumer cannot tell the difference
(tests/integration/test_stream.py compares with the whole model at 1e-5 in fp32).

A batch runs whole when its rows share fewer than ``MIN_SHARED`` leading tokens (left
truncation cut some prompts' start), and when a sliding window shorter than the batch is in
force: between the shared part and the own tokens sit the padding columns, which a window
measured in columns would count.

Masks and rotary embeddings depend only on the batch, so they are made once, not per block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lens_merge.lens.hidden import EncodedBatch

MIN_SHARED = 4


def attention_kind(layer: nn.Module, config) -> str:
    """``full_attention`` or ``sliding_attention``, as the model's forward picks the mask.

    Layers with ``attention_type`` (Qwen2/3, Gemma2) name theirs; the others (Llama, Mistral,
    Phi-3) use the sliding-window mask when the config sets ``sliding_window``.
    """
    kind = getattr(layer, "attention_type", None)
    if kind:
        return kind
    return ("sliding_attention" if getattr(config, "sliding_window", None) is not None
            else "full_attention")


def block_mask(kind: str, config, h: torch.Tensor, mask: torch.Tensor,
               position_ids: torch.Tensor) -> torch.Tensor | None:
    """The attention mask the model's forward makes for blocks of ``kind`` over ``h`` [B, T, .]
    (only its shape, dtype and device are read), without a KV cache."""
    import torch
    from transformers.masking_utils import (
        create_causal_mask,
        create_sliding_window_causal_mask,
    )

    make = {"full_attention": create_causal_mask,
            "sliding_attention": create_sliding_window_causal_mask}[kind]
    return make(config=config, input_embeds=h, attention_mask=mask,
                cache_position=torch.arange(h.shape[1], device=h.device), past_key_values=None,
                position_ids=position_ids)


def call_block(layer: nn.Module, h: torch.Tensor, mask, position_ids: torch.Tensor,
               position_embeddings, cache_position: torch.Tensor, past=None) -> torch.Tensor:
    """One decoder block's output [B, T, d] (``past``: a KV cache the block reads and extends)."""
    out = layer(h, attention_mask=mask, position_ids=position_ids, past_key_values=past,
                use_cache=past is not None, cache_position=cache_position,
                position_embeddings=position_embeddings)
    return out[0] if isinstance(out, tuple) else out


def shared_length(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Leading tokens every row of a left-padded batch starts with, at most each row's length
    minus one (every row keeps a token of its own)."""
    import torch

    n = mask.sum(1)
    most = int(n.min()) - 1
    if most < 1:
        return 0
    T = ids.shape[1]
    starts = [T - int(k) for k in n]
    heads = torch.stack([ids[b, s:s + most] for b, s in enumerate(starts)])
    same = (heads == heads[:1]).all(0).long().cumprod(0)
    return int(same.sum())


class Rows:
    """One batch's states as the blocks run: whole rows, or a shared part and own tokens.

    Args:
        batch: the encoded prompts (on the pass's device).
        config: the model config (attention implementation, sliding window).
        rotary: the model's rotary embedding module.
        kinds: the attention kinds of the model's blocks (``attention_kind``).
        dtype: the states' dtype (the masks are made in it).
    """

    def __init__(self, batch: EncodedBatch, config, rotary: nn.Module, kinds: set[str],
                 dtype: torch.dtype) -> None:
        import torch

        mask, pos = batch.attention_mask, batch.position_ids
        B, T = mask.shape
        window = getattr(config, "sliding_window", None)
        P = shared_length(batch.input_ids, mask)
        if P < MIN_SHARED or ("sliding_attention" in kinds and window is not None
                              and window < T):
            P = 0
        self.shared = P
        self.config, self._h, self._pre = config, None, None
        shape = torch.zeros((), dtype=dtype, device=mask.device).expand(B, T, 1)
        if not P:
            self._pos = pos
            self._cache_position = torch.arange(T, device=mask.device)
            self._pe = rotary(shape, pos)
            self._masks = {k: block_mask(k, config, shape, mask, pos) for k in kinds}
            return
        # the shared part: positions 0..P-1 (row 0's columns s..s+P-1); the own tokens: the
        # last T-P columns, left padded, whose mask in the whole row is mask[:, :T-P] (a row
        # of n tokens has its own n-P at its end)
        pre_pos = torch.arange(P, device=mask.device).unsqueeze(0)
        self._pre_pos, self._pre_start = pre_pos, T - int(mask[0].sum())
        self._pos = pos[:, P:]
        whole_mask = torch.cat([torch.ones_like(mask[:, :P]), mask[:, :T - P]], 1)
        whole_pos = torch.cat([pre_pos.expand(B, P), self._pos], 1)
        # rotary over the whole rows (Phi-3's longrope picks its factors from the longest)
        cos, sin = rotary(shape, whole_pos)
        self._pre_pe = (cos[:1, :P], sin[:1, :P])
        self._pe = (cos[:, P:], sin[:, P:])
        self._cache_position = torch.arange(P, T, device=mask.device)
        self._pre_masks, self._masks = {}, {}
        for k in kinds:
            self._pre_masks[k] = block_mask(k, config, shape[:1, :P], whole_mask[:1, :P],
                                            pre_pos)
            m = block_mask(k, config, shape, whole_mask, whole_pos)
            self._masks[k] = None if m is None else m[:, :, P:].contiguous()
        # where each column of the batch's own layout is in [shared | own]
        n = mask.sum(1, keepdim=True)
        col = torch.arange(T, device=mask.device).unsqueeze(0).expand(B, T)
        pad = T - n
        self._layout = torch.where(col < pad, P + col,
                                   torch.where(col < pad + P, col - pad, col))

    def start(self, h: torch.Tensor) -> None:
        """Take the embeddings [B, T, d] of the batch."""
        if not self.shared:
            self._h = h
            return
        P, s = self.shared, self._pre_start
        self._pre = h[:1, s:s + P]
        self._h = h[:, P:]

    def block(self, layer: nn.Module) -> None:
        """Run one decoder block."""
        kind = attention_kind(layer, self.config)
        if not self.shared:
            self._h = call_block(layer, self._h, self._masks[kind], self._pos, self._pe,
                                 self._cache_position)
            return
        from transformers import DynamicCache

        B = self._h.shape[0]
        past = DynamicCache()
        self._pre = call_block(layer, self._pre, self._pre_masks[kind], self._pre_pos,
                               self._pre_pe, self._pre_pos[0], past)
        kv = past.layers[-1]
        own_past = DynamicCache()
        own_past.update(kv.keys.expand(B, -1, -1, -1), kv.values.expand(B, -1, -1, -1),
                        len(past.layers) - 1)
        self._h = call_block(layer, self._h, self._masks[kind], self._pos, self._pe,
                             self._cache_position, own_past)

    def norm(self, norm: nn.Module) -> None:
        """Apply the final norm."""
        self._h = norm(self._h)
        if self.shared:
            self._pre = norm(self._pre)

    def hidden(self) -> torch.Tensor:
        """The batch's states [B, T, d] in its own left-padded layout (as the whole rows)."""
        if not self.shared:
            return self._h
        import torch

        B, d = self._h.shape[0], self._h.shape[-1]
        both = torch.cat([self._pre.expand(B, -1, -1), self._h], 1)
        return both.gather(1, self._layout.unsqueeze(-1).expand(-1, -1, d))
