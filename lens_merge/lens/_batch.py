"""One batch of eval's measuring pass: its size, its shared prefill and its branches.

- ``row_bytes`` / ``plan_batches`` / ``default_budget``: rows per batch from a memory budget;
- ``Prefix``: the batch's prompts (all but the last token) once through the base model, the
  inputs of blocks N-K..N-1 kept, from which each branch's KV cache is made;
- ``steered``: a decoder block with a vector added to its input (the steering baseline);
- ``Tap`` / ``run_branch``: one branch's first-step state and logits, and greedy replies.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

FALLBACK_BUDGET = 2 << 30  # bytes, when the machine's free memory cannot be read


class Tap:
    """Hooks keeping the first call's last-position final-norm state and logits."""

    def __init__(self, model, norm) -> None:
        self.state = self.logits = None
        self._handles = [norm.register_forward_hook(self._on_norm),
                         model.register_forward_hook(self._on_model)]

    def reset(self) -> None:
        self.state = self.logits = None

    def _on_norm(self, module, args, out) -> None:
        if self.state is None:
            h = out[0] if isinstance(out, tuple) else out
            self.state = h[:, -1].float().cpu().clone()

    def _on_model(self, module, args, out) -> None:
        if self.logits is None:
            self.logits = out.logits[:, -1].float().cpu().clone()

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def row_bytes(config, dtype_bytes: int, prompt_len: int, new_tokens: int) -> int:
    """Working memory of one prompt row: two KV caches (shared prefill, running branch), logits,
    prefill peaks.

    Args:
        config: the model's transformers config.
        dtype_bytes: bytes per element of the model's dtype.
        prompt_len: prompt tokens of the row (its batch's padded length).
        new_tokens: tokens generated per row.

    Returns:
        Bytes, an upper estimate (KV for every layer, eager attention scores in fp32).
    """
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    inter = getattr(c, "intermediate_size", None) or 4 * c.hidden_size
    kv = c.num_hidden_layers * kv_heads * head_dim * 2 * dtype_bytes * (prompt_len + new_tokens)
    logits = c.vocab_size * 4 * 4  # step logits, processed scores and their fp32 copies
    prefill = prompt_len * (3 * heads * prompt_len * 4 + (3 * inter + 8 * c.hidden_size)
                            * dtype_bytes)
    return 2 * kv + logits + prefill


def plan_batches(lengths: list[int], cost: Callable[[int], int], budget: int,
                 cap: int) -> list[list[int]]:
    """Rows grouped by length: ascending, each batch within ``budget`` and ``cap`` rows.

    Args:
        lengths: token length of each row.
        cost: bytes per row for a batch padded to a given length.
        budget: bytes a batch may take; a row over it alone still gets a batch of one.
        cap: most rows per batch.

    Returns:
        Row indices per batch; together a permutation of ``range(len(lengths))``.
    """
    out: list[list[int]] = []
    cur: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        if cur and (len(cur) + 1 > cap or (len(cur) + 1) * cost(lengths[i]) > budget):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def default_budget(device) -> int:
    """Bytes for eval's batches: half the free GPU memory, or a quarter of available RAM.

    Rounded down to a power of two, so the batches (and the report's last digits) do not move
    with small changes in free memory from one run to the next.
    """
    from lens_merge.plan.machine import device_available

    kind = getattr(device, "type", str(device))
    free = (device_available(str(device)) or 0) // (2 if kind == "cuda" else 4)
    return 1 << (free.bit_length() - 1) if free > 0 else FALLBACK_BUDGET


class Prefix:
    """One batch's prefill (every prompt token but the last) through the base model.

    ``take_base`` hands over the base branch's KV cache (once); ``cache`` makes another
    branch's: the base's bottom entries (the same tensors: ``generate`` appends by
    concatenation, so they stay as they are) and the top K run again from the kept inputs of
    block N-K. At most two caches are alive at a time (these bottom entries and the running
    branch's), as ``row_bytes`` counts.
    """

    _CACHE = object()  # stands for the cache in the kept block arguments

    def __init__(self, model, blocks: Any, ids, mask, pos) -> None:
        from transformers import DynamicCache

        self.config, self.blocks = model.config, blocks
        base = DynamicCache(config=model.config)
        self.seen: dict[int, tuple] = {}

        def grab(bid: int):
            def hook(module, args, kwargs):
                rest = {k: (self._CACHE if v is base else v) for k, v in kwargs.items()
                        if k != "hidden_states"}
                self.seen[bid] = (args[0] if args else kwargs["hidden_states"], args[1:], rest)
                return None
            return hook

        handles = [blocks.layers[bid].register_forward_pre_hook(grab(bid), with_kwargs=True)
                   for bid in range(blocks.first, blocks.n)]
        try:
            model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=base,
                  use_cache=True, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
        self.bottom = [copy.copy(layer) for layer in base.layers[:blocks.first]]
        self._base = base

    def take_base(self):
        """The base branch's cache (the prefill's own); None once taken."""
        base, self._base = self._base, None
        return base

    def cache(self, lens: bool, shift=None):
        """A branch's cache: Lens blocks or base blocks, ``shift`` [B, 1, d] added to the
        input of block N-K (None: nothing added)."""
        from transformers import DynamicCache

        out = DynamicCache(config=self.config)
        out.layers[:len(self.bottom)] = [copy.copy(layer) for layer in self.bottom]
        h = self.seen[self.blocks.first][0]
        if shift is not None:
            h = h + shift.to(h.dtype)
        for bid in range(self.blocks.first, self.blocks.n):
            _, rest, kwargs = self.seen[bid]
            kwargs = {k: (out if v is self._CACHE else v) for k, v in kwargs.items()}
            o = self.blocks.block(bid, lens=lens)(h, *rest, **kwargs)
            h = o[0] if isinstance(o, tuple) else o
        return out


@contextmanager
def steered(block, shift) -> Iterator[None]:
    """``block`` (a decoder block) with ``shift`` [B, 1, d] added to its input hidden states on
    every call; nothing when ``shift`` is None."""
    if shift is None:
        yield
        return

    def hook(module, args, kwargs):
        if args:
            return (args[0] + shift.to(args[0].dtype), *args[1:]), kwargs
        h = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": h + shift.to(h.dtype)}

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _generation_config(model):
    """The model's generation config, without a cache implementation (we pass the cache)."""
    gc = model.generation_config
    if getattr(gc, "cache_implementation", None) is None:
        return None
    gc = copy.deepcopy(gc)
    gc.cache_implementation = None
    return gc


def stop_ids(model, tok) -> set[int]:
    """Token ids that end a reply: the generation config's end-of-sequence ids and the pad."""
    eos = model.generation_config.eos_token_id
    out = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return out | ({tok.pad_token_id} if tok.pad_token_id is not None else set())


def run_branch(model, tok, tap: Tap, enc: dict, cache, max_new_tokens: int):
    """One branch's last-token state, logits, greedy replies and their token ids."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    tap.reset()
    if max_new_tokens > 0:
        kwargs = {} if cache is None else {"past_key_values": cache}
        gc = _generation_config(model)
        if gc is not None and cache is not None:
            kwargs["generation_config"] = gc
        seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id, **kwargs)
        new = seq[:, ids.shape[1]:]
        replies = tok.batch_decode(new, skip_special_tokens=True)
        stops = stop_ids(model, tok)
        got = []
        for row in new.tolist():
            cut = next((j for j, t in enumerate(row) if t in stops), len(row))
            got.append(tuple(row[:cut]))
    else:
        last = slice(-1, None) if cache is not None else slice(None)
        model(input_ids=ids[:, last], attention_mask=mask,
              position_ids=enc["position_ids"][:, last], past_key_values=cache,
              use_cache=cache is not None, logits_to_keep=1)
        replies, got = [], []
    return tap.state, tap.logits, replies, got
