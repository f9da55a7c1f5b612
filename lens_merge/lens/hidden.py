"""Prompt formatting, batching and pooled hidden states, shared by probe, train and eval.

Every forward here uses left padding and explicit position ids computed from the attention
mask, so a prompt's states do not depend on how much padding its batch needed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lens_merge.progress import NULL, Progress

if TYPE_CHECKING:
    import torch

Pooling = Literal["last", "mean"]


def format_prompt(tokenizer, text: str, chat_template: bool = True) -> str:
    """The text the model sees: the chat template with the generation prompt, when it has one."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             add_generation_prompt=True, tokenize=False)
    return text


def encode(tokenizer, texts: Sequence[str], max_length: int, chat_template: bool = True):
    """Tokenize prompts with left padding and left truncation (the answer position survives).

    Returns:
        dict with ``input_ids``, ``attention_mask`` and ``position_ids`` tensors.
    """
    prompts = [format_prompt(tokenizer, t, chat_template) for t in texts]
    templated = chat_template and getattr(tokenizer, "chat_template", None)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                    max_length=max_length, add_special_tokens=not templated)
    enc["position_ids"] = position_ids(enc["attention_mask"])
    return dict(enc)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding: 0 at each prompt's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Pool [B, T, d] states to [B, d]: last position (left padded) or masked mean.

    Returns a new tensor, never a view: a kept ``[B, d]`` must not hold ``[B, T, d]`` alive.
    """
    if pooling == "last":
        return hidden[:, -1, :].clone()
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def pool_layers(hidden_states: Sequence[torch.Tensor], mask: torch.Tensor,
                pooling: Pooling) -> torch.Tensor:
    """Pool HF ``hidden_states`` (embeddings first) at every block output: [N, B, d] fp32."""
    import torch

    hs = torch.stack(tuple(hidden_states[1:]), 0)  # [N, B, T, d]
    n, b, t, d = hs.shape
    pooled = pool(hs.reshape(n * b, t, d), mask.repeat(n, 1), pooling)
    return pooled.reshape(n, b, d).float().cpu()


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@dataclass
class EncodedBatch:
    """One batch of prompts of one language, encoded (left padded, explicit positions).

    ``rows``: each row's index among its language's texts (``in_row_order`` puts per-batch
    results back in that order); None: the batch holds no rows known by index.
    """

    lang: str
    input_ids: torch.Tensor       # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor    # [B, T]
    rows: tuple[int, ...] | None = None

    def to(self, device) -> EncodedBatch:
        return EncodedBatch(self.lang, self.input_ids.to(device),
                            self.attention_mask.to(device), self.position_ids.to(device),
                            self.rows)


def encode_batches(tokenizer, texts: Mapping[str, Sequence[str]], max_length: int,
                   batch_size: int, chat_template: bool = True,
                   by_length: bool = False) -> list[EncodedBatch]:
    """Encode every language's texts in batches of ``batch_size``, language by language.

    Args:
        by_length: group each language's rows by token length (shortest first), so a batch
            pads little; ``EncodedBatch.rows`` says where each row came from.

    Returns:
        The batches, language-major (rows in order within a language unless ``by_length``).
    """
    out = []
    for lang, items in texts.items():
        items = list(items)
        order = list(range(len(items)))
        if by_length:
            enc = encode(tokenizer, items, max_length, chat_template)
            n = enc["attention_mask"].sum(1).tolist()
            order.sort(key=lambda i: (n[i], i))
        for chunk in batches(order, batch_size):
            enc = encode(tokenizer, [items[i] for i in chunk], max_length, chat_template)
            out.append(EncodedBatch(lang, enc["input_ids"], enc["attention_mask"],
                                    enc["position_ids"], tuple(chunk)))
    return out


def in_row_order(batches: Sequence[EncodedBatch], parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-batch results [B_i, ...] of one language's batches, concatenated in row order."""
    import torch

    rows = [r for b in batches for r in (b.rows or ())]
    out = torch.cat(list(parts))
    if len(rows) != len(out):
        raise ValueError(f"{len(out)} results for {len(rows)} rows known by index")
    return out[torch.tensor(rows).argsort()]


def pooled_states(
    model,
    tokenizer,
    texts: Sequence[str],
    pooling: Pooling,
    max_length: int,
    batch_size: int,
    chat_template: bool = True,
    progress: Progress = NULL,
    description: str = "hidden states",
) -> torch.Tensor:
    """Pooled states at every layer: [n_layers, n_texts, d].

    Layer k is the output of block k (HF ``hidden_states[k + 1]``); the last layer is taken
    after the final norm, as transformers returns it.
    """
    import torch

    outs = []
    with torch.inference_mode(), progress.task(description, total=len(texts)) as task:
        for chunk in batches(list(texts), batch_size):
            enc = encode(tokenizer, chunk, max_length, chat_template)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            out = model(**enc, output_hidden_states=True, use_cache=False,
                        logits_to_keep=1)
            outs.append(pool_layers(out.hidden_states, enc["attention_mask"], pooling))
            task.advance(len(chunk))
    return torch.cat(outs, 1)
