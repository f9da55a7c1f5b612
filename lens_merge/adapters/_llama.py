"""llama.cpp's side of the adapter parity checks, shared by the LoRA GGUF and control vector
verifiers: opening a GGUF (optionally with a LoRA), prompts through the GGUF's own chat
template, logits, greedy continuations, control vectors, and the running tally of a check.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from lens_merge.errors import AdapterError
from lens_merge.parity.metrics import GenerationTally


def require_llama(what: str):
    """``llama_cpp``, or an AdapterError naming the extra that installs it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise AdapterError(f"{what} needs llama.cpp through llama-cpp-python: pip install "
                           "'lens-merge[llama]'") from exc
    return llama_cpp


def open_llama(path: str | Path, n_ctx: int, n_threads: int = 2, lora_path: str | Path | None
               = None, lora_scale: float = 1.0):
    """A CPU ``llama_cpp.Llama`` keeping every position's logits (with a LoRA when given).

    Raises:
        AdapterError: the file is missing or llama.cpp refuses it (or the adapter).
    """
    llama_cpp = require_llama("this check")
    for p in (path, lora_path):
        if p is not None and not Path(p).is_file():
            raise AdapterError(f"{p}: no such GGUF file")
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx,
                               n_threads=n_threads, n_threads_batch=n_threads, n_gpu_layers=0,
                               logits_all=True, verbose=False, seed=0,
                               lora_path=None if lora_path is None else str(lora_path),
                               lora_scale=lora_scale)
    except (ValueError, RuntimeError) as exc:
        what = f"{path} with the LoRA {lora_path}" if lora_path else str(path)
        raise AdapterError(f"llama.cpp cannot load {what}: {exc}") from None


def adapter_limits(kind: str, variant: str | None, path: str | Path) -> dict[str, float]:
    """The parity limits of an adapter check for the model type ``variant``.

    Raises:
        AdapterError: no row for that type, naming the file and the types there are rows for.
    """
    from lens_merge.parity.thresholds import THRESHOLDS, thresholds_for

    try:
        return thresholds_for(kind, str(variant))
    except KeyError:
        raise AdapterError(f"{path}: no {kind} thresholds for a {variant} model; verify against "
                           f"one of {', '.join(THRESHOLDS[kind])}") from None


def token_text(llm, token: int | None) -> str:
    """The text of one special token (empty for None)."""
    if token is None or token < 0:
        return ""
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace")


def _meta_int(llm, key: str) -> int | None:
    v = llm.metadata.get(key)
    return int(v) if v is not None and str(v).lstrip("-").isdigit() else None


def eos_ids(llm) -> set[int]:
    """The end-of-generation ids llama.cpp knows for the file (eos, eot)."""
    ids = {_meta_int(llm, "tokenizer.ggml.eos_token_id"),
           _meta_int(llm, "tokenizer.ggml.eot_token_id"), int(llm.token_eos())}
    return {i for i in ids if isinstance(i, int) and i >= 0}


def file_type_label(llm) -> str | None:
    """The output type name (``f16``, ``q4_1``) of the loaded GGUF's ``general.file_type``."""
    from lens_merge.export.gguf._types import outtype_for_file_type

    ft = _meta_int(llm, "general.file_type")
    ot = outtype_for_file_type(ft) if ft is not None else None
    return ot.name if ot else None


def gguf_prompt_ids(llm, text: str) -> list[int]:
    """Token ids of ``text`` as a user turn, rendered with the GGUF's own chat template
    (generation prompt added); plain text with BOS when the file has no template."""
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(
        template=template, add_generation_prompt=True,
        eos_token=token_text(llm, _meta_int(llm, "tokenizer.ggml.eos_token_id")),
        bos_token=token_text(llm, _meta_int(llm, "tokenizer.ggml.bos_token_id")))
    shown = fmt(messages=[{"role": "user", "content": text}]).prompt
    return llm.tokenize(shown.encode("utf-8"), add_bos=False, special=True)


def decode(llm, tokens: list[int]) -> str:
    """Tokens as text (special tokens shown), as llama.cpp detokenizes them."""
    return llm.detokenize(tokens, special=True).decode("utf-8", errors="replace")


def scores(llm, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] of one prompt, evaluated from an empty cache."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)  # a copy: the buffer is reused


def set_control_vector(llm, directions: dict[int, np.ndarray] | None, n_layer: int) -> None:
    """Apply per-layer directions (llama.cpp layer il: added to block il's output) to the
    context, the way llama.cpp's own ``--control-vector`` loader does; None clears it.

    Raises:
        AdapterError: a direction of the wrong length, layer 0 or a layer past the model.
    """
    llama_cpp = require_llama("a control vector")
    n_embd = int(llama_cpp.llama_model_n_embd(llm.model))
    if not directions:
        llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, n_embd, -1, -1)
        return
    bad = [k for k in directions if not 1 <= k < n_layer]
    if bad:
        raise AdapterError(f"control vector layer(s) {bad} outside 1..{n_layer - 1} (llama.cpp "
                           "adds no vector to layer 0)")
    data = np.zeros(n_embd * (n_layer - 1), dtype=np.float32)  # layer 1 at [0]
    for k, v in directions.items():
        if v.shape != (n_embd,):
            raise AdapterError(f"control vector direction.{k} has {v.size} values, the model's "
                               f"n_embd is {n_embd}")
        data[n_embd * (k - 1):n_embd * k] += v
    buf = (ctypes.c_float * data.size).from_buffer_copy(data.tobytes())
    rc = llama_cpp.llama_set_adapter_cvec(llm.ctx, buf, data.size, n_embd, 1, n_layer - 1)
    if rc != 0:
        raise AdapterError(f"llama.cpp refused the control vector (returned {rc})")
    llm._lens_cvec = buf  # keep the buffer alive as long as the context uses it


def n_layer_of(llm) -> int:
    llama_cpp = require_llama("a control vector")
    return int(llama_cpp.llama_model_n_layer(llm.model))


def compare_row(lang: str, text: str, ids: list[int], ref: np.ndarray, got: np.ndarray,
                ref_gen: list[int], got_gen: list[int], texts: tuple[str, str]
                ) -> tuple[dict[str, Any], list[bool]]:
    """One prompt's row of a parity report, and its per-position top-1 agreement.

    ``texts``: the two greedy continuations decoded (reference, subject).
    """
    from lens_merge.parity.metrics import first_mismatch, max_abs_diff, top1_same

    if got.shape != ref.shape:
        raise AdapterError(f"logits of shape {got.shape} cannot be compared with {ref.shape}")
    same = top1_same(ref, got)
    mismatch = first_mismatch(ref_gen, got_gen)
    row = {"language": lang, "prompt": text, "n_tokens": len(ids),
           "max_abs_logit_diff": max_abs_diff(ref, got), "top1_agreement": sum(same) / len(same),
           "generation_match": mismatch is None,
           "first_token_match": mismatch is None or mismatch > 0, "first_mismatch": mismatch,
           "reference": texts[0], "subject": texts[1]}
    return row, same


def tally_rows(rows: list[tuple[list[int], dict[str, Any], list[bool]]]
               ) -> tuple[GenerationTally, dict[str, GenerationTally]]:
    """Totals and per-language tallies of compared rows (row gains ``n_new_contexts``)."""
    total, per_lang = GenerationTally(), {}
    for ids, row, same in rows:
        row["n_new_contexts"], row["top1_same_new"] = total.add(ids, row, same)
        per_lang.setdefault(row["language"], GenerationTally()).add(ids, row, same)
    return total, per_lang
