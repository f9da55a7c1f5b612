"""Logits of parity prompts from one model at a time.

A verifier that compares two torch models runs the reference over every prompt first, keeps
its logits (``[tokens, vocab]`` fp32 per prompt: small next to a model), frees it, and only
then loads the other: the peak is one model, never two. ``prompt_logits`` is that pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def prompt_logits(model: Any, tok: Any, items: Sequence[tuple[str, str]], max_length: int,
                  batch_size: int, device: str = "cpu", task: Any = None,
                  visit: Callable[[int, list[int], Any], None] | None = None
                  ) -> list[tuple[list[int], Any]]:
    """Per prompt: its real (non-padding) token ids and fp32 logits ``[tokens, vocab]``.

    Prompts are encoded in batches of ``batch_size`` (chat template, left padding, as
    ``lens.hidden.encode``), so two models given the same items see the same batches. With
    ``visit``, each prompt's logits go to ``visit(index, ids, logits)`` in order instead of
    being kept: a pass compared on the fly with a kept one adds nothing to the peak.

    Args:
        model: a transformers causal LM (eval mode; moved to ``device`` by the caller).
        tok: its tokenizer.
        items: ``(language, text)`` pairs (``parity.prompts.parity_prompts``).
        max_length: max prompt tokens.
        batch_size: prompts per forward pass.
        device: torch device of the inputs.
        task: a progress task advanced by the batch size (or None).

    Returns:
        One ``(token ids, logits on the CPU)`` pair per item, in order (empty with
        ``visit``).
    """
    import torch

    from lens_merge.lens.hidden import batches, encode

    out, done = [], 0
    with torch.no_grad():
        for chunk in batches(items, batch_size):
            enc = {k: v.to(device) for k, v in
                   encode(tok, [t for _, t in chunk], max_length).items()}
            logits = model(**enc).logits.float()
            mask = enc["attention_mask"].bool()
            for i in range(len(chunk)):
                ids = enc["input_ids"][i][mask[i]].tolist()
                row = logits[i][mask[i]].cpu()  # a copy, not a view
                if visit is None:
                    out.append((ids, row))
                else:
                    visit(done, ids, row)
                done += 1
            del logits
            if task is not None:
                task.advance(len(chunk))
    return out
