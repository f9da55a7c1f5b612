"""The whole-model training cache: one full forward with ``output_hidden_states``.

This was ``lens_merge.lens.train.cache.build_cache`` before the cache pass was streamed one
block at a time (``lens_merge.lens.stream``); kept as the oracle the streamed cache is compared
with (tests/integration/test_stream.py). Not used by the library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from lens_merge.lens.train.cache import LensCache
from lens_merge.progress import NULL, Progress

if TYPE_CHECKING:
    import torch

    from lens_merge.data import PromptSet


def full_model_cache(
    model,
    tokenizer,
    prompts: PromptSet,
    top_k: int,
    max_length: int,
    batch_size: int,
    chat_template: bool = True,
    input_scale: float = 1.0,
    progress: Progress = NULL,
    observe: Callable[[str, tuple, torch.Tensor], None] | None = None,
) -> LensCache:
    """Run the frozen model once over every prompt and keep what training needs.

    Args:
        model, tokenizer: the base model (frozen here) and its tokenizer.
        prompts: parallel prompts, English first.
        top_k: K; the cache holds the stream entering block N-K.
        max_length, batch_size, chat_template: prompt encoding (see ``lens_merge.lens.hidden``).
        input_scale: divide cached states by this (Gemma scales ``inputs_embeds``).
        observe: called as ``observe(lang, hidden_states, attention_mask)`` after every batch,
            so that another consumer (the probe) can share this forward pass.
    """
    import torch

    from lens_merge.lens.hidden import batches, encode, pool

    n_blocks = model.config.num_hidden_layers
    first = n_blocks - top_k
    if not 0 <= first < n_blocks:
        raise ValueError(f"top_k={top_k} does not fit a model of {n_blocks} blocks")
    langs = list(prompts.languages)
    xs: dict[str, list[torch.Tensor]] = {lang: [] for lang in langs}
    last = {lang: [] for lang in langs}
    mean_en = []
    total = len(prompts) * len(langs)
    with torch.inference_mode(), progress.task("cache (frozen blocks)", total=total) as task:
        for lang in langs:
            for chunk in batches(prompts.texts(lang), batch_size):
                enc = encode(tokenizer, chunk, max_length, chat_template)
                enc = {k: v.to(model.device) for k, v in enc.items()}
                out = model(**enc, output_hidden_states=True, use_cache=False,
                        logits_to_keep=1)
                h_in = out.hidden_states[first].float() / input_scale
                h_fin = out.hidden_states[-1].float()
                lens = enc["attention_mask"].sum(1).tolist()
                for b, n in enumerate(lens):
                    xs[lang].append(h_in[b, h_in.shape[1] - n:].clone().cpu())
                last[lang].append(pool(h_fin, enc["attention_mask"], "last").cpu())
                if lang == langs[0]:
                    mean_en.append(pool(h_fin, enc["attention_mask"], "mean").cpu())
                if observe is not None:
                    observe(lang, out.hidden_states, enc["attention_mask"])
                task.advance(len(chunk))
    ref_last = torch.stack([torch.cat(last[lang]) for lang in langs], 1)
    return LensCache(langs, first, xs, ref_last, torch.cat(mean_en),
                     {"n_rows": len(prompts), "top_k": top_k, "max_length": max_length})
