"""The training cache: the residual stream entering block N-K and the reference outputs.

Blocks below N-K are frozen, so their output never changes during training: it is computed
once, with the reference outputs the losses need (the final states at the last token of every
language, the English masked mean, and the base's next-token log-probabilities at the last
English token, through the frozen head). A training step then runs only the top K blocks and
the final norm, and no second (reference) model is kept in memory. The cache is
keyed by everything that determines it and reused by runs that differ only in loss weights,
learning rate or schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_merge.lens.train.replies import REPLY, greedy_replies, reply_batches
from lens_merge.lens.train.store import pad_batch
from lens_merge.progress import NULL, Progress

if TYPE_CHECKING:
    import torch

    from lens_merge.data import PromptSet
    from lens_merge.lens.hidden import EncodedBatch

# (batch, k, hidden, mask): the batch's language and rows (``EncodedBatch.rows``)
Observe = Callable[["EncodedBatch", int, "torch.Tensor", "torch.Tensor"], None]


@dataclass
class LensCache:
    """Per row and language: block-(N-K) input states; reference last/mean states; the
    base's English next-token log-probabilities.

    In memory, as ``build_cache`` returns it; ``save`` writes it as a cache folder that the
    trainer reads per batch (``lens_merge.lens.train.store.DiskCache``).
    """

    languages: list[str]
    first_block: int
    x: dict[str, list[torch.Tensor]]       # lang -> per row [T_i, d] (unpadded)
    ref_last: torch.Tensor                 # [n, L, d] reference final state, last token
    ref_mean_en: torch.Tensor              # [n, d] reference masked mean of English states
    meta: dict[str, Any] = field(default_factory=dict)
    rows: list[int] | None = None          # global row ids held (None: 0..n-1)
    # [n, V] fp32 base log-probabilities at the last English token (None: not computed)
    ref_logp_en: torch.Tensor | None = None
    # per row [T_i, d]: block-(N-K) input of the English prompt followed by the base's greedy
    # reply without its last token, and the reply's length m_i (its last m_i positions
    # produced the reply); None: no replies (``train.lambda_kl_replies`` = 0)
    x_reply: list[torch.Tensor] | None = None
    reply_len: list[int] | None = None

    def __len__(self) -> int:
        return self.ref_last.shape[0]

    def row_ids(self) -> list[int]:
        """The global row ids held, in order."""
        return list(range(len(self))) if self.rows is None else list(self.rows)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """Left-pad the rows ``idx`` (global ids) of every language into one batch,
        language-major.

        Returns:
            ``x`` [L*B, T, d], ``mask`` [L*B, T], ``ref_last`` [B, L, d],
            ``ref_mean_en`` [B, d], ``ref_logp_en`` [B, V] (when held), ``index`` [B];
            with replies, ``x_reply`` [B, T', d], ``mask_reply`` [B, T'] and
            ``reply_len`` [B].
        """
        import torch

        pos = {r: j for j, r in enumerate(self.row_ids())}
        at = [pos[i] for i in idx]
        x, mask = pad_batch([self.x[lang][j] for lang in self.languages for j in at])
        ix = torch.tensor(at)
        out = {"x": x, "mask": mask, "ref_last": self.ref_last[ix],
               "ref_mean_en": self.ref_mean_en[ix]}
        if self.ref_logp_en is not None:
            out["ref_logp_en"] = self.ref_logp_en[ix]
        if self.x_reply is not None and self.reply_len is not None:
            xr, mr = pad_batch([self.x_reply[j] for j in at])
            out |= {"x_reply": xr, "mask_reply": mr,
                    "reply_len": torch.tensor([self.reply_len[j] for j in at])}
        return out | {"index": torch.tensor(idx)}

    def save(self, path: str | Path) -> None:
        """Write a cache folder with one shard (atomically: it appears whole or not at all).

        Args:
            path: the folder, ``cache/<key16>`` under the work dir.
        """
        from lens_merge.files import atomic_dir
        from lens_merge.lens.train.store import Shard, shard_name, write_meta, write_shard

        name = shard_name(0, 1)
        with atomic_dir(path, overwrite=True) as tmp:
            write_shard(self, tmp / name)
            write_meta(tmp, self, int(self.meta.get("n_rows", len(self))),
                       [Shard(file=name, rows=self.row_ids())])


def build_cache(
    model_dir: str | Path,
    tokenizer,
    prompts: PromptSet,
    top_k: int,
    max_length: int,
    batch_size: int,
    chat_template: bool = True,
    dtype: str | None = "fp32",
    device: str = "cpu",
    progress: Progress = NULL,
    observe: Observe | None = None,
    rows: list[int] | None = None,
    reply_tokens: int = 0,
) -> LensCache:
    """Stream the frozen model once over every prompt and keep what training needs.

    The model is never loaded whole: ``lens_merge.lens.stream.stream`` runs the prompts
    through one block at a time, so peak memory is one block plus the prompts' activations.

    Args:
        model_dir: the base model directory (safetensors weights).
        tokenizer: its tokenizer.
        prompts: parallel prompts, English first.
        top_k: K; the cache holds the stream entering block N-K.
        max_length, batch_size, chat_template: prompt encoding (see ``lens_merge.lens.hidden``).
        dtype: compute dtype of the frozen blocks (``fp32``/``bf16``/``fp16``; None: as
            stored); the cache itself is fp32.
        device: torch device of the pass.
        observe: called as ``observe(batch, k, hidden, attention_mask)`` for every prompt
            batch (``EncodedBatch``: its language and rows; batches are length-sorted) and
            k = 0..N, with ``hidden`` the batch's HF ``hidden_states[k]``, so that another
            consumer (the probe) can share this pass.
        rows: build only these rows (global indices into ``prompts``, kept in this order):
            one process's shard under ``accelerate launch``; None: every row.
        reply_tokens: > 0: also generate the base's greedy English reply of at most this
            many tokens to every row (``replies.greedy_replies``, the whole model loaded once
            before the streamed pass) and keep the block-(N-K) input along prompt + reply
            (``x_reply``, ``reply_len``), streamed in the same pass; 0: none.

    Returns:
        The cache; rows in prompt order (or ``rows``' order), the inputs ``x`` divided by
        the model's input scale (Gemma multiplies ``inputs_embeds`` by sqrt(hidden) in its
        forward); ``ref_logp_en`` from the head read after the pass, in ``dtype``.
    """
    import torch
    from transformers import AutoConfig

    from lens_merge.architectures import for_config
    from lens_merge.lens.hidden import encode_batches, in_row_order, pool
    from lens_merge.lens.stream import input_scale_of, stream

    config = AutoConfig.from_pretrained(str(model_dir))
    n_blocks = config.num_hidden_layers
    first = n_blocks - top_k
    if not 0 <= first < n_blocks:
        raise ValueError(f"top_k={top_k} does not fit a model of {n_blocks} blocks")
    input_scale = input_scale_of(config, for_config(config.to_dict()))
    langs = list(prompts.languages)
    n_rows = len(prompts)
    if rows is not None:
        if any(not 0 <= r < n_rows for r in rows):
            raise ValueError(f"rows {rows} are not all in 0..{n_rows - 1}")
        prompts = replace(prompts, rows=tuple(prompts.rows[r] for r in rows))
    batches = encode_batches(tokenizer, {lang: prompts.texts(lang) for lang in langs},
                             max_length, batch_size, chat_template, by_length=True)
    reply_len: list[int] | None = None
    if reply_tokens > 0:
        pairs = greedy_replies(model_dir, tokenizer, prompts.texts(langs[0]), max_length,
                               reply_tokens, chat_template, dtype, device, batch_size, progress)
        reply_len = [len(r) for _, r in pairs]
        batches += reply_batches(pairs, batch_size, by_length=True)
    # per language (and REPLY): (row, block-(N-K) input [T_i, d]); per batch: the last and
    # English mean states; put back in row order after the pass (batches are length-sorted)
    xs: dict[str, list[tuple[int, torch.Tensor]]] = {lang: [] for lang in [*langs, REPLY]}
    last: dict[str, list[torch.Tensor]] = {lang: [] for lang in langs}
    mean_en: list[torch.Tensor] = []

    def visit(k: int, i: int, h: torch.Tensor) -> None:
        b = batches[i]
        lang, mask = b.lang, b.attention_mask.to(h.device)
        if k == first:
            h_in = h.float() / input_scale
            xs[lang].extend((r, h_in[j, h_in.shape[1] - n:].clone().cpu())
                            for j, (r, n) in enumerate(zip(b.rows, mask.sum(1).tolist(),
                                                           strict=True)))
        if lang == REPLY:  # the English replies: only the stream entering block N-K
            return
        if k == n_blocks:
            h_fin = h.float()
            last[lang].append(pool(h_fin, mask, "last").cpu())
            if lang == langs[0]:
                mean_en.append(pool(h_fin, mask, "mean").cpu())
        if observe is not None:
            observe(b, k, h, mask)

    stream(model_dir, batches, visit, dtype, device, progress, "cache (frozen blocks)")
    of = {lang: [b for b in batches if b.lang == lang] for lang in langs}
    ref_last = torch.stack([in_row_order(of[lang], last[lang]) for lang in langs], 1)
    x = {lang: [t for _, t in sorted(xs[lang], key=lambda rt: rt[0])] for lang in [*langs, REPLY]}
    x_reply = x.pop(REPLY)
    return LensCache(langs, first, x, ref_last, in_row_order(of[langs[0]], mean_en),
                     {"n_rows": n_rows, "top_k": top_k, "max_length": max_length,
                      "dtype": dtype or "stored", **({"reply_tokens": reply_tokens}
                                                    if reply_tokens else {})},
                     None if rows is None else list(rows),
                     reference_log_probs(model_dir, ref_last[:, 0], dtype, device),
                     x_reply if reply_len is not None else None, reply_len)


def reference_log_probs(model_dir: str | Path, z: torch.Tensor, dtype: str | None = "fp32",
                        device: str = "cpu", chunk: int = 64) -> torch.Tensor:
    """The base's next-token log-probabilities of final states ``z`` [n, d].

    The head (one tensor, [V, d] in ``dtype``) is read once the blocks are freed; rows go
    through it ``chunk`` at a time.

    Returns:
        [n, V] fp32 on the CPU.
    """
    import torch

    from lens_merge.lens.train.stack import load_head

    head = load_head(model_dir, dtype, device)
    with torch.inference_mode():
        out = [head.log_probs(z[i:i + chunk].to(device)).cpu() for i in range(0, len(z), chunk)]
    return torch.cat(out)
