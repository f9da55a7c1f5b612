"""The training cache: the residual stream entering block N-K and the reference outputs.

Blocks below N-K are frozen, so their output never changes during training: it is computed
once, with the reference outputs the losses need. A training step then runs only the top K
blocks and the final norm, and no second (reference) model is kept in memory. The cache is
keyed by everything that determines it and reused by runs that differ only in loss weights,
learning rate or schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_merge.progress import NULL, Progress

if TYPE_CHECKING:
    import torch

    from lens_merge.data import PromptSet

Observe = Callable[[str, int, "torch.Tensor", "torch.Tensor"], None]  # (lang, k, hidden, mask)


@dataclass
class LensCache:
    """Per row and language: block-(N-K) input states; reference last/mean states."""

    languages: list[str]
    first_block: int
    x: dict[str, list[torch.Tensor]]       # lang -> per row [T_i, d] (unpadded)
    ref_last: torch.Tensor                 # [n, L, d] reference final state, last token
    ref_mean_en: torch.Tensor              # [n, d] reference masked mean of English states
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.ref_last.shape[0]

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """Left-pad the rows ``idx`` of every language into one batch, language-major.

        Returns:
            ``x`` [L*B, T, d], ``mask`` [L*B, T], ``ref_last`` [B, L, d],
            ``ref_mean_en`` [B, d], ``index`` [B].
        """
        import torch

        seqs = [self.x[lang][i] for lang in self.languages for i in idx]
        T = max(s.shape[0] for s in seqs)
        d = seqs[0].shape[1]
        x = seqs[0].new_zeros((len(seqs), T, d))
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for j, s in enumerate(seqs):
            x[j, T - s.shape[0]:] = s
            mask[j, T - s.shape[0]:] = 1
        ix = torch.tensor(idx)
        return {"x": x, "mask": mask, "ref_last": self.ref_last[ix],
                "ref_mean_en": self.ref_mean_en[ix], "index": ix}

    def save(self, path: str | Path) -> None:
        import torch

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        torch.save({"languages": self.languages, "first_block": self.first_block, "x": self.x,
                    "ref_last": self.ref_last, "ref_mean_en": self.ref_mean_en,
                    "meta": self.meta}, tmp)
        tmp.replace(p)

    @classmethod
    def load(cls, path: str | Path) -> LensCache:
        import torch

        d = torch.load(Path(path), weights_only=True)
        return cls(d["languages"], d["first_block"], d["x"], d["ref_last"], d["ref_mean_en"],
                   d["meta"])


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
        observe: called as ``observe(lang, k, hidden, attention_mask)`` for every batch and
            k = 0..N, with ``hidden`` the batch's HF ``hidden_states[k]``, so that another
            consumer (the probe) can share this pass.

    Returns:
        The cache; rows in prompt order, the inputs ``x`` divided by the model's input scale
        (Gemma multiplies ``inputs_embeds`` by sqrt(hidden) in its forward).
    """
    import torch
    from transformers import AutoConfig

    from lens_merge.architectures import for_config
    from lens_merge.lens.hidden import encode_batches, pool
    from lens_merge.lens.stream import input_scale_of, stream

    config = AutoConfig.from_pretrained(str(model_dir))
    n_blocks = config.num_hidden_layers
    first = n_blocks - top_k
    if not 0 <= first < n_blocks:
        raise ValueError(f"top_k={top_k} does not fit a model of {n_blocks} blocks")
    input_scale = input_scale_of(config, for_config(config.to_dict()))
    langs = list(prompts.languages)
    batches = encode_batches(tokenizer, {lang: prompts.texts(lang) for lang in langs},
                             max_length, batch_size, chat_template)
    xs: dict[str, list[torch.Tensor]] = {lang: [] for lang in langs}
    last: dict[str, list[torch.Tensor]] = {lang: [] for lang in langs}
    mean_en: list[torch.Tensor] = []

    def visit(k: int, i: int, h: torch.Tensor) -> None:
        lang, mask = batches[i].lang, batches[i].attention_mask.to(h.device)
        if k == first:
            h_in = h.float() / input_scale
            for b, n in enumerate(mask.sum(1).tolist()):
                xs[lang].append(h_in[b, h_in.shape[1] - n:].clone().cpu())
        if k == n_blocks:
            h_fin = h.float()
            last[lang].append(pool(h_fin, mask, "last").cpu())
            if lang == langs[0]:
                mean_en.append(pool(h_fin, mask, "mean").cpu())
        if observe is not None:
            observe(lang, k, h, mask)

    stream(model_dir, batches, visit, dtype, device, progress, "cache (frozen blocks)")
    ref_last = torch.stack([torch.cat(last[lang]) for lang in langs], 1)
    return LensCache(langs, first, xs, ref_last, torch.cat(mean_en),
                     {"n_rows": len(prompts), "top_k": top_k, "max_length": max_length,
                      "dtype": dtype or "stored"})
