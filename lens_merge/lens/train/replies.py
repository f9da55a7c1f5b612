"""The base's own greedy English replies, the positions the English reply KL keeps.

Lens trains on prompts only, and the English terms on prompt positions alone leave the states a
reply is generated from (the reply's own tokens) free to drift: the base's greedy reply then
changes a few tokens in. So the cache also holds, for every English training prompt, the base
model's greedy reply (written by the model itself: no response data is needed), and the
trainer keeps the next-token distribution at each position that produced a reply token
(``train.lambda_kl_replies``), teacher-forced on the base's tokens.

A row's sequence is the prompt followed by its reply without the last token: its last ``m``
positions (``m`` = the reply's length) are the ones whose next tokens are the reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lens_merge.progress import NULL, Progress

if TYPE_CHECKING:
    import torch

    from lens_merge.lens.hidden import EncodedBatch

REPLY = "en+reply"  # the batches' label in the cache's streamed pass


def greedy_replies(
    model_dir: str | Path,
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    new_tokens: int,
    chat_template: bool = True,
    dtype: str | None = "fp32",
    device: str = "cpu",
    batch_size: int = 16,
    progress: Progress = NULL,
) -> list[tuple[list[int], list[int]]]:
    """The base model's greedy replies to ``texts``, encoded as eval encodes its prompts.

    The model is loaded whole (in ``dtype``), used and freed before the streamed pass.

    Args:
        model_dir, tokenizer: the base model and its tokenizer.
        texts: English prompts.
        max_length, chat_template: prompt encoding (``lens_merge.lens.hidden.encode``).
        new_tokens: most reply tokens; a reply ends at its first end-of-sequence token
            (kept: ending there is part of the reply).
        dtype, device: the model's dtype and device.
        batch_size: prompts per ``generate`` call.

    Returns:
        Per text, ``(prompt_ids, reply_ids)`` (unpadded; ``reply_ids`` has 1..new_tokens ids).
    """
    import torch

    from lens_merge.lens.hidden import batches, encode
    from lens_merge.memory import release_memory
    from lens_merge.models import load_model

    model = load_model(model_dir, dtype=dtype, device=device)
    stops = set(_ids(model.generation_config.eos_token_id)) | set(_ids(tokenizer.eos_token_id))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stops))
    out: list[tuple[list[int], list[int]]] = []
    try:
        with torch.inference_mode(), progress.task("base English replies",
                                                   total=len(texts)) as task:
            for chunk in batches(list(texts), batch_size):
                enc = {k: v.to(model.device)
                       for k, v in encode(tokenizer, chunk, max_length, chat_template).items()}
                gen = model.generate(input_ids=enc["input_ids"],
                                     attention_mask=enc["attention_mask"],
                                     max_new_tokens=new_tokens, do_sample=False,
                                     temperature=None, top_p=None, top_k=None,
                                     pad_token_id=pad)
                T = enc["input_ids"].shape[1]
                for b in range(len(chunk)):
                    prompt = enc["input_ids"][b][enc["attention_mask"][b].bool()].tolist()
                    out.append((prompt, _cut(gen[b, T:].tolist(), stops)))
                task.advance(len(chunk))
    finally:
        del model
        release_memory()
    return out


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _cut(ids: list[int], stops: set[int]) -> list[int]:
    """A reply up to and including its first stop token."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i + 1]
    return ids


def reply_batches(pairs: Sequence[tuple[list[int], list[int]]], batch_size: int,
                  by_length: bool = False) -> list[EncodedBatch]:
    """Left-padded batches of ``prompt + reply[:-1]``, labelled ``REPLY`` (``by_length``:
    rows grouped by length; ``EncodedBatch.rows`` holds each row's index in ``pairs``)."""
    import torch

    from lens_merge.lens.hidden import EncodedBatch, batches, position_ids

    out = []
    order = list(range(len(pairs)))
    if by_length:
        order.sort(key=lambda i: (len(pairs[i][0]) + len(pairs[i][1]), i))
    for chunk in batches(order, batch_size):
        seqs = [pairs[i][0] + pairs[i][1][:-1] for i in chunk]
        T = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), T), dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[j, T - len(s):] = 1
        out.append(EncodedBatch(REPLY, ids, mask, position_ids(mask), tuple(chunk)))
    return out


def reply_positions(mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the last ``lengths[b]`` positions of each left-padded row."""
    import torch

    T = mask.shape[1]
    return torch.arange(T).unsqueeze(0) >= (T - lengths.long()).unsqueeze(1)
