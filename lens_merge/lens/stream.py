"""The frozen model, streamed one block at a time over every prompt.

Probing and caching only read hidden states of the frozen model, so the whole model need never
be in memory: the prompts are embedded, then block 0 is loaded from the shards, run over every
batch and freed, then block 1, ... then the final norm (``stream``). Peak memory is one block
plus the activations of the prompts. The blocks are the model's own transformers modules (built
on the meta device from the config, filled by ``lens_merge.weights.blocks.BlockLoader``), run
with the masks, rotary embeddings and input scaling of the model's own forward in transformers
4.57 (``run_blocks``), so every architecture in the tables is served by the same code. Each
batch runs the prompt prefix all its rows share (a chat template's system prompt) once, as a
batch of one, and the rest of each row after it (``lens_merge.lens._rows``).

A visitor sees what Hugging Face returns as ``hidden_states[k]`` for each batch: k = 0 is the
input of block 0 (scaled embeddings), 1..N-1 the output of block k-1, N after the final norm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lens_merge.progress import NULL, Progress

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lens_merge.lens.hidden import EncodedBatch, Pooling

Visit = Callable[[int, int, "torch.Tensor"], None]  # (k, batch index, hidden_states[k])


def input_scale_of(config, arch) -> float:
    """The factor the model multiplies its input embeddings by (Gemma: sqrt(hidden))."""
    return config.hidden_size ** 0.5 if arch.input_scale == "sqrt_hidden" else 1.0


def run_blocks(layers: Sequence[nn.Module], h: torch.Tensor, mask: torch.Tensor,
               position_ids: torch.Tensor, config, rotary: nn.Module) -> torch.Tensor:
    """Run decoder blocks over ``h`` [B, T, d] as the model's forward does (no KV cache).

    Args:
        layers: decoder blocks, in order.
        h: the residual stream entering the first of them.
        mask: [B, T] attention mask (left padding).
        position_ids: [B, T] positions (``lens_merge.lens.hidden.position_ids``).
        config: the model config (attention implementation, sliding window).
        rotary: the model's rotary embedding module.

    Returns:
        The output of the last block [B, T, d] (before the final norm).
    """
    import torch

    from lens_merge.lens._rows import attention_kind, block_mask, call_block

    masks: dict[str, torch.Tensor | None] = {}
    position_embeddings = rotary(h, position_ids)
    for layer in layers:
        kind = attention_kind(layer, config)
        if kind not in masks:
            masks[kind] = block_mask(kind, config, h, mask, position_ids)
        h = call_block(layer, h, masks[kind], position_ids, position_embeddings,
                       torch.arange(h.shape[1], device=h.device))
    return h


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def stream(
    model_dir: str | Path,
    batches: Sequence[EncodedBatch],
    visit: Visit,
    dtype: str | None = "fp32",
    device: str = "cpu",
    progress: Progress = NULL,
    description: str = "frozen blocks",
) -> int:
    """Run every batch through the frozen model one block at a time; ``visit`` each state.

    Args:
        model_dir: the model directory (safetensors weights).
        batches: encoded prompts (``lens_merge.lens.hidden.encode_batches``).
        visit: called as ``visit(k, b, h)`` for k = 0..N and every batch b, with h the HF
            ``hidden_states[k]`` of batch b ([B, T, d], in ``dtype``). States are freed after
            the call: keep copies (``.clone()``) of what is needed later.
        dtype: compute dtype (``fp32``/``bf16``/``fp16``), None for the checkpoint's.
        device: torch device for the weights and the activations.
        progress: one step per part (embeddings, each block, the final norm).

    Returns:
        N, the number of decoder blocks.
    """
    import torch

    from lens_merge.architectures import for_config
    from lens_merge.lens._rows import Rows, attention_kind
    from lens_merge.models import empty_model, torch_dtype
    from lens_merge.weights.blocks import BlockLoader

    model = empty_model(model_dir, dtype)
    config = model.config
    decoder = model.base_model
    loader = BlockLoader(model_dir, torch_dtype(dtype) if dtype else None, device)
    names = _module_names(model)
    rotary = decoder.rotary_emb.to(device)
    scale = input_scale_of(config, for_config(config.to_dict()))
    layers = decoder.layers
    n = len(layers)
    kinds = {attention_kind(layer, config) for layer in layers}
    runs = [Rows(b.to(device), config, rotary, kinds, model.dtype) for b in batches]

    def embed_all(embed: nn.Module) -> None:
        for i, (b, run) in enumerate(zip(batches, runs, strict=True)):
            h = embed(b.input_ids.to(device))
            if scale != 1.0:  # as Gemma2's forward: a tensor of the states' dtype
                h = h * torch.tensor(scale, dtype=h.dtype)
            run.start(h)
            visit(0, i, h)

    def block_all(k: int, layer: nn.Module) -> None:
        for i, run in enumerate(runs):
            run.block(layer)
            if k < n - 1:
                visit(k + 1, i, run.hidden())

    def norm_all(norm: nn.Module) -> None:
        for i, run in enumerate(runs):
            run.norm(norm)
            visit(n, i, run.hidden())

    parts = [(model.get_input_embeddings(), embed_all),
             *[(layer, lambda m, k=k: block_all(k, m)) for k, layer in enumerate(layers)],
             (decoder.norm, norm_all)]
    with progress.task(description, total=len(parts)) as task:
        for module, run in parts:
            loaded = loader.load(model, names[id(module)])  # outside inference mode: the
            with torch.inference_mode():                    # parameters stay parameters
                run(module)
            loader.release(model, loaded)
            task.advance(1)
    return n


def pooled_layer_states(
    model_dir: str | Path,
    tokenizer,
    texts: Mapping[str, Sequence[str]],
    pooling: Pooling,
    max_length: int,
    batch_size: int,
    chat_template: bool = True,
    dtype: str | None = "fp32",
    device: str = "cpu",
    progress: Progress = NULL,
) -> dict[str, torch.Tensor]:
    """Pooled states at every layer of every language, from one streamed pass.

    Layer k is HF ``hidden_states[k + 1]`` (the last layer after the final norm), as
    ``lens_merge.lens.hidden.pooled_states`` returns for a loaded model.

    Returns:
        ``{lang: [n_layers, len(texts[lang]), d]}`` fp32 on the CPU.
    """
    import torch

    from lens_merge.lens.hidden import encode_batches, in_row_order, pool

    batches = encode_batches(tokenizer, texts, max_length, batch_size, chat_template,
                             by_length=True)
    masks = [b.attention_mask for b in batches]
    pooled: dict[int, list[torch.Tensor]] = {}

    def visit(k: int, i: int, h: torch.Tensor) -> None:
        if k > 0:
            pooled.setdefault(k, []).append(
                pool(h, masks[i].to(h.device), pooling).float().cpu())

    n = stream(model_dir, batches, visit, dtype, device, progress, "probe (frozen blocks)")
    out: dict[str, torch.Tensor] = {}
    for lang in texts:
        rows = [i for i, b in enumerate(batches) if b.lang == lang]
        out[lang] = torch.stack([in_row_order([batches[i] for i in rows],
                                              [pooled[k][i] for i in rows])
                                 for k in range(1, n + 1)])
    return out
