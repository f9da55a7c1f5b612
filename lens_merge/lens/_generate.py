"""Eval's measuring pass: one model, the delta's blocks twice, every block below them shared.

Base, Lens and steering differ only from the lowest block the delta changes (N-K) up. Per batch
of prompts:

1. prefill: every prompt token but the last goes once through the base model into a KV cache,
   and the inputs of the top K blocks are kept (``_batch.Prefix``); another branch's cache is the
   base's bottom entries (shared tensors) plus its own top K, run on the same inputs: through
   the Lens copies of the blocks (Lens), or through the base blocks with a per-row vector added
   to the input of block N-K (steering);
2. per branch (``Branch``) ``generate`` continues from that cache: its first step takes the
   last prompt token, and hooks keep that step's final-norm state and logits (no
   ``output_hidden_states``, no per-step logits kept); a steered branch adds its vector to the
   input of block N-K at every step too. The first step's logits are reduced at once to the
   probability mass on the row's language's indicative tokens; only the English rows' logits
   are kept whole (for KL).

Batches hold prompts of similar token length (sorted across languages, results put back in
order), as many rows as a memory budget allows for their KV caches, logits and prefill.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lens_merge.errors import DeltaError
from lens_merge.lens._batch import (  # noqa: F401  (batch sizing re-exported: eval's API)
    FALLBACK_BUDGET,
    Prefix,
    Tap,
    default_budget,
    plan_batches,
    row_bytes,
    run_branch,
    steered,
)
from lens_merge.lens.hidden import encode
from lens_merge.progress import NULL, Progress

if TYPE_CHECKING:
    import torch

    from lens_merge.architectures import Architecture
    from lens_merge.data import PromptSet
    from lens_merge.weights.delta import LensDelta



@dataclass
class Measured:
    """One branch's measurements, in the prompt set's order."""

    states: dict[str, Any]  # language -> [n, d] fp32 final last-token states
    logits: Any  # [n_en, V] fp32 next-token logits of the English (first-language) prompts
    replies: dict[str, list[str]]  # language -> greedy replies (empty without generation)
    # language -> [n] fp64 first-reply-position mass on its indicative tokens (languages given
    # token ids only)
    mass: dict[str, Any] = field(default_factory=dict)
    # language -> greedy reply token ids, cut at the first end-of-sequence or pad token
    reply_ids: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Branch:
    """One way of running the prompts: the base, the Lens blocks swapped in, or steering.

    ``steer``: language -> [d] vector added to the input of block ``LensBlocks.first`` at every
    position of that language's rows (rows of other languages are run unsteered);
    ``new_tokens``: greedy reply tokens (None: ``measure``'s ``max_new_tokens``; 0: only the
    first reply position's state and logits).
    """

    label: str
    lens: bool = False
    steer: dict[str, Any] | None = None
    new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.lens and self.steer is not None:
            raise ValueError(f"branch {self.label!r}: steering runs on the base blocks, not Lens")


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


def _shift(branch: Branch, langs: list[str], d: int, device):
    """The [B, 1, d] vectors a steered branch adds for rows of languages ``langs``; None."""
    import torch

    if branch.steer is None:
        return None
    zero = torch.zeros(d)
    return torch.stack([branch.steer.get(lang, zero).float().cpu()
                        for lang in langs])[:, None].to(device)


def _keep(out: dict, rows: list[int], langs: list[str], res: tuple,
          token_ids: dict[str, list[int]] | None, keep_logits: str | None) -> None:
    """Put one batch's results of a branch into ``out`` at its rows; the first-token mass
    computed here, per language, from the batch's logits (no [n_all, V] tensor is held)."""
    from lens_merge.lens.fidelity import first_token_mass

    s, lg, replies, ids = res
    for lang in set(langs) & set(token_ids or {}):
        at = [j for j, x in enumerate(langs) if x == lang]
        for j, v in zip(at, first_token_mass(lg[at], token_ids[lang]).tolist(), strict=True):
            out["mass"][rows[j]] = v
    for j, i in enumerate(rows):
        out["state"][i] = s[j]
        if langs[j] == keep_logits:
            out["logits"][i] = lg[j].clone()  # not a view of the [B, V] logits
        out["reply"][i] = replies[j] if replies else ""
        out["ids"][i] = ids[j] if ids else ()


class Runner:
    """Prompts encoded and planned into length-sorted batches, run branch by branch.

    With ``keep`` every batch's ``Prefix`` (bottom KV cache and top-block inputs) is held
    between ``run`` calls, so later branches skip the prefill: for a few rows run many times
    (steering's alpha choice); without it each batch's prefix lives for one ``run`` call.

    Args:
        items: the rows, each a language code and its prompt text.
        new_tokens: the most reply tokens any branch will generate (for the batch plan).
        keep: hold the prefixes between calls.
        Others as ``measure``.
    """

    def __init__(self, model, tok, blocks: LensBlocks, items: list[tuple[str, str]],
                 max_length: int, batch_size: int, chat_template: bool, budget: int,
                 new_tokens: int, keep: bool = False) -> None:
        self.model, self.tok, self.blocks, self.items, self.keep = model, tok, blocks, items, keep
        enc = encode(tok, [text for _, text in items], max_length, chat_template)
        self.enc, self.lengths = enc, [int(n) for n in enc["attention_mask"].sum(-1)]
        dtype_bytes = next(model.parameters()).element_size()
        self.plan = plan_batches(self.lengths, lambda n: row_bytes(
            model.config, dtype_bytes, n, new_tokens), budget, batch_size)
        self._prefix: dict[int, Prefix | None] = {}

    def _batch(self, k: int, rows: list[int]) -> tuple[dict, Prefix | None]:
        n = max(self.lengths[i] for i in rows)
        mask = self.enc["attention_mask"][rows, -n:]
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate
        enc = {key: v.to(self.model.device) for key, v in (
            ("input_ids", self.enc["input_ids"][rows, -n:]), ("attention_mask", mask),
            ("position_ids", pos))}
        prefix = self._prefix.get(k)
        if prefix is None and n > 1:
            prefix = Prefix(self.model, self.blocks, enc["input_ids"][:, :-1],
                            enc["attention_mask"][:, :-1], enc["position_ids"][:, :-1])
            if self.keep:
                self._prefix[k] = prefix
        return enc, prefix

    def run(self, branches: list[Branch], max_new_tokens: int,
            token_ids: dict[str, list[int]] | None = None, keep_logits: str | None = None,
            progress: Progress = NULL, what: str = "eval",
            wanted: set[int] | None = None) -> dict[str, dict]:
        """Every branch over the rows, sharing each batch's bottom prefill.

        Args:
            branches: what to run; their labels are the result's keys.
            max_new_tokens: reply tokens of a branch without its own ``new_tokens``.
            token_ids: language -> indicative token ids (``fidelity.indicative_tokens``): each
                row's first-reply-position mass on its language's ids (others get NaN).
            keep_logits: the language whose rows keep their whole next-token logits.
            wanted: row indices that matter; batches without one are skipped (None: all).

        Returns:
            ``{label: {"state", "logits", "reply", "ids", "mass"}}``: per-row lists
            (``logits``: {row: [V]} of ``keep_logits`` rows).
        """
        import torch

        model, blocks, n_all = self.model, self.blocks, len(self.items)
        got = {b.label: {"state": [None] * n_all, "logits": {}, "reply": [""] * n_all,
                         "ids": [()] * n_all, "mass": [float("nan")] * n_all}
               for b in branches}
        tap = Tap(model, model.get_submodule(blocks.arch.final_norm.rpartition(".")[0]))
        d = model.config.get_text_config().hidden_size
        try:
            with torch.inference_mode(), progress.task(what, total=n_all) as task:
                for k, rows in enumerate(self.plan):
                    if wanted is not None and not wanted.intersection(rows):
                        continue
                    enc, prefix = self._batch(k, rows)
                    langs = [self.items[i][0] for i in rows]
                    for b in branches:
                        shift = _shift(b, langs, d, model.device)
                        cache = None
                        if prefix is not None:
                            plain = b.label == "base" and not b.lens and shift is None
                            cache = prefix.take_base() if plain and not self.keep else None
                            cache = cache if cache is not None else prefix.cache(b.lens, shift)
                        with (blocks.swapped() if b.lens else nullcontext(),
                              steered(blocks.layers[blocks.first], shift)):
                            res = run_branch(model, self.tok, tap, enc, cache, max_new_tokens
                                             if b.new_tokens is None else b.new_tokens)
                        del cache
                        _keep(got[b.label], rows, langs, res, token_ids, keep_logits)
                    task.advance(len(rows))
        finally:
            tap.close()
        return got


def measure(model, tok, blocks: LensBlocks, prompts: PromptSet, max_length: int,
            batch_size: int, max_new_tokens: int, chat_template: bool, budget: int,
            progress: Progress = NULL, token_ids: dict[str, list[int]] | None = None,
            steer: dict[str, Any] | None = None) -> tuple[dict[str, Measured], int]:
    """Base, Lens (and steering) measurements of every prompt, sharing the blocks below N-K.

    Args:
        model, tok, blocks: the base model, its tokenizer and the Lens copies of its blocks.
        prompts: held-out prompts (English first).
        max_length, chat_template: prompt encoding (``lens_merge.lens.hidden.encode``).
        batch_size: most rows per batch; budget: bytes a batch may take (``row_bytes``).
        max_new_tokens: greedy reply tokens; 0 measures the first reply position only.
        token_ids: language -> indicative token ids for the first-token mass.
        steer: language -> [d] vector (alpha already applied) for a third branch, ``steer``:
            the base blocks with the vector added to block N-K's input for that language's
            rows (other rows, English among them, unsteered).

    Returns:
        ``({"base": .., "lens": .., ["steer": ..]}, n_batches)``.
    """
    import torch

    langs = list(prompts.languages)
    items = [(lang, text) for lang in langs for text in prompts.texts(lang)]
    branches = [Branch("base"), Branch("lens", lens=True)]
    if steer is not None:
        branches.append(Branch("steer", steer=steer))
    runner = Runner(model, tok, blocks, items, max_length, batch_size, chat_template, budget,
                    max_new_tokens)
    got = runner.run(branches, max_new_tokens, token_ids, langs[0], progress,
                     "eval " + "+".join(b.label for b in branches))
    of = {lang: [i for i, it in enumerate(items) if it[0] == lang] for lang in langs}

    def gather(g: dict) -> Measured:
        keep = max_new_tokens > 0
        return Measured({lang: torch.stack([g["state"][i] for i in of[lang]]) for lang in langs},
                        torch.stack([g["logits"][i] for i in sorted(g["logits"])]),
                        {lang: [g["reply"][i] for i in of[lang]] if keep else [] for lang in langs},
                        {lang: torch.tensor([g["mass"][i] for i in of[lang]], dtype=torch.float64)
                         for lang in langs if lang in (token_ids or {})},
                        {lang: [g["ids"][i] for i in of[lang]] if keep else [] for lang in langs})

    return {label: gather(g) for label, g in got.items()}, len(runner.plan)
