"""Eval's measuring pass: one model, the delta's blocks twice, every block below them shared.

Base and Lens differ only in the blocks the delta changes (the top K). Per batch of prompts:

1. prefill: every prompt token but the last goes once through the base model into a KV cache,
   and the inputs of the top K blocks are kept; the Lens copies of those blocks run on the same
   inputs, so the Lens cache is the base's bottom entries (shared tensors) plus its own top K;
2. per branch (base, then Lens with its blocks swapped into the block list) ``generate``
   continues from that cache: its first step takes the last prompt token, and hooks keep that
   step's final-norm state and logits (no ``output_hidden_states``, no per-step logits kept).

Batches hold prompts of similar token length (sorted across languages, results put back in
order), as many rows as a memory budget allows for their KV caches, logits and prefill.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lens_merge.errors import DeltaError
from lens_merge.lens.hidden import encode
from lens_merge.progress import NULL, Progress

if TYPE_CHECKING:
    import torch

    from lens_merge.architectures import Architecture
    from lens_merge.data import PromptSet
    from lens_merge.weights.delta import LensDelta

FALLBACK_BUDGET = 2 << 30  # bytes, when the machine's free memory cannot be read


@dataclass
class Measured:
    """One branch's measurements, in the prompt set's order."""

    states: dict[str, Any]  # language -> [n, d] fp32 final last-token states
    logits: Any  # [n_en, V] fp32 next-token logits of the English (first-language) prompts
    replies: dict[str, list[str]]  # language -> greedy replies (empty without generation)


class LensBlocks:
    """The Lens copies of the blocks a delta changes, swapped into the model on demand.

    Every block from the lowest changed one up is run for the Lens branch; only the changed
    ones are copied (base + dW, computed in fp32 and cast back as ``apply_delta`` does).
    """

    def __init__(self, model, arch: Architecture, delta: LensDelta) -> None:
        import torch

        self.model, self.arch = model, arch
        self.n = len(self.layers)
        per_block: dict[int, dict[str, torch.Tensor]] = {}
        for name, d in delta.tensors.items():
            bid = arch.block_of(name)
            if bid is None or bid >= self.n:
                raise DeltaError(f"delta tensor {name!r} is not in a decoder block "
                                 f"(0..{self.n - 1}); eval shares all but the changed blocks")
            per_block.setdefault(bid, {})[name[len(arch.block_prefix.format(bid=bid)):]] = d
        if not per_block:
            raise DeltaError("delta changes no tensor; nothing to evaluate")
        self.first = min(per_block)
        self.lens: dict[int, torch.nn.Module] = {}
        with torch.no_grad():
            for bid, tensors in sorted(per_block.items()):
                block = copy.deepcopy(self.layers[bid])
                params = dict(block.named_parameters())
                params.update(dict(block.named_buffers()))
                for sub, d in tensors.items():
                    p, full = params.get(sub), arch.block_prefix.format(bid=bid) + sub
                    if p is None:
                        raise DeltaError(f"delta tensor {full!r} is not a parameter of the model")
                    if tuple(p.shape) != tuple(d.shape):
                        raise DeltaError(f"delta tensor {full}: shape {tuple(d.shape)} != model "
                                         f"parameter shape {tuple(p.shape)}")
                    p.copy_((p.float() + d.to(p.device)).to(p.dtype))
                self.lens[bid] = block

    @property
    def layers(self):
        """The decoder's block list (a ``ModuleList``)."""
        path = self.arch.block_prefix.format(bid=0).rstrip(".").rpartition(".")[0]
        return self.model.get_submodule(path)

    def block(self, bid: int, lens: bool):
        """Block ``bid`` of the base (``lens=False``) or of the Lens branch."""
        return self.lens[bid] if lens and bid in self.lens else self.layers[bid]

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The model with the Lens blocks in its block list; the base ones put back on exit."""
        layers = self.layers
        base = {bid: layers[bid] for bid in self.lens}
        try:
            for bid, block in self.lens.items():
                layers[bid] = block
            yield
        finally:
            for bid, block in base.items():
                layers[bid] = block


class _Tap:
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
    """Working memory of one prompt row: KV caches of both branches, logits, prefill peaks.

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


def _prefill(model, blocks: LensBlocks, ids, mask, pos):
    """KV caches of base and Lens for ``ids`` (the prompts minus their last token)."""
    from transformers import DynamicCache

    base = DynamicCache(config=model.config)
    seen: dict[int, tuple] = {}

    def grab(bid: int):
        def hook(module, args, kwargs):
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            seen[bid] = (args[0] if args else kwargs["hidden_states"], args[1:], rest)
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
    lens = DynamicCache(config=model.config)
    bottom = [copy.copy(layer) for layer in base.layers[:blocks.first]]  # same tensors
    lens.layers[:len(bottom)] = bottom
    h = seen[blocks.first][0]
    for bid in range(blocks.first, blocks.n):
        _, rest, kwargs = seen[bid]
        kwargs = {k: (lens if v is base else v) for k, v in kwargs.items()}
        out = blocks.block(bid, lens=True)(h, *rest, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
    seen.clear()
    return base, lens


def _generation_config(model):
    """The model's generation config, without a cache implementation (we pass the cache)."""
    gc = model.generation_config
    if getattr(gc, "cache_implementation", None) is None:
        return None
    gc = copy.deepcopy(gc)
    gc.cache_implementation = None
    return gc


def _branch(model, tok, tap: _Tap, enc: dict, cache, max_new_tokens: int):
    """One branch's last-token state, logits and greedy replies, continuing ``cache``."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    tap.reset()
    if max_new_tokens > 0:
        kwargs = {} if cache is None else {"past_key_values": cache}
        gc = _generation_config(model)
        if gc is not None and cache is not None:
            kwargs["generation_config"] = gc
        seq = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id, **kwargs)
        replies = tok.batch_decode(seq[:, ids.shape[1]:], skip_special_tokens=True)
    else:
        last = slice(-1, None) if cache is not None else slice(None)
        model(input_ids=ids[:, last], attention_mask=mask,
              position_ids=enc["position_ids"][:, last], past_key_values=cache,
              use_cache=cache is not None, logits_to_keep=1)
        replies = []
    return tap.state, tap.logits, replies


def measure(model, tok, blocks: LensBlocks, prompts: PromptSet, max_length: int,
            batch_size: int, max_new_tokens: int, chat_template: bool, budget: int,
            progress: Progress = NULL) -> tuple[Measured, Measured, int]:
    """Base and Lens measurements of every prompt, sharing the blocks below the delta's.

    Returns:
        ``(base, lens, n_batches)``.
    """
    import torch

    langs = list(prompts.languages)
    items = [(lang, text) for lang in langs for text in prompts.texts(lang)]
    enc_all = encode(tok, [text for _, text in items], max_length, chat_template)
    lengths = [int(n) for n in enc_all["attention_mask"].sum(-1)]
    dtype_bytes = next(model.parameters()).element_size()
    plan = plan_batches(lengths, lambda n: row_bytes(model.config, dtype_bytes, n,
                                                     max_new_tokens), budget, batch_size)
    # per branch, per row in prompt order: state, English logits, reply
    got = {label: ([None] * len(items), {}, [""] * len(items)) for label in ("base", "lens")}
    tap = _Tap(model, model.get_submodule(blocks.arch.final_norm.rpartition(".")[0]))
    try:
        with torch.inference_mode(), progress.task("eval base+lens", total=len(items)) as task:
            for rows in plan:
                n = max(lengths[i] for i in rows)
                mask = enc_all["attention_mask"][rows, -n:]
                pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate
                enc = {k: v.to(model.device) for k, v in (
                    ("input_ids", enc_all["input_ids"][rows, -n:]), ("attention_mask", mask),
                    ("position_ids", pos))}
                caches = (_prefill(model, blocks, enc["input_ids"][:, :-1],
                                   enc["attention_mask"][:, :-1], enc["position_ids"][:, :-1])
                          if n > 1 else (None, None))
                for b, label in enumerate(("base", "lens")):
                    with blocks.swapped() if label == "lens" else nullcontext():
                        s, lg, replies = _branch(model, tok, tap, enc, caches[b], max_new_tokens)
                    caches = (None, caches[1])  # the base cache is done with
                    z, first, rep = got[label]
                    for j, i in enumerate(rows):
                        z[i] = s[j]
                        if items[i][0] == langs[0]:
                            first[i] = lg[j].clone()  # not a view of the [B, V] logits
                        rep[i] = replies[j] if replies else ""
                task.advance(len(rows))
    finally:
        tap.close()

    def gather(label: str) -> Measured:
        z, first, rep = got[label]
        of = {lang: [i for i, it in enumerate(items) if it[0] == lang] for lang in langs}
        return Measured({lang: torch.stack([z[i] for i in of[lang]]) for lang in langs},
                        torch.stack([first[i] for i in sorted(first)]),
                        {lang: [rep[i] for i in of[lang]] if max_new_tokens > 0 else []
                         for lang in langs})

    return gather("base"), gather("lens"), len(plan)
