"""The two engines' sides of a GGUF parity check: llama.cpp's view of the file (its keys,
greedy decoding, chat template rendering) and transformers' greedy reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lens_merge.parity.reference import generation_eos

__all__ = ["chat_template_match", "gguf_facts", "generation_eos", "hf_greedy", "llama_greedy"]


def gguf_facts(llm) -> dict[str, Any]:
    """Scalar GGUF keys as llama.cpp itself read them."""
    md = llm.metadata

    def num(key):
        v = md.get(key)
        return int(v) if v is not None and str(v).lstrip("-").isdigit() else None

    return {"file_type": num("general.file_type"), "eos": num("tokenizer.ggml.eos_token_id"),
            "eot": num("tokenizer.ggml.eot_token_id"),
            "chat_template": md.get("tokenizer.chat_template")}


def hf_greedy(model, ids: list[int], max_new: int, eos: set[int]) -> list[int]:
    """transformers' greedy continuation of ``ids`` (cut after the first eos)."""
    import torch

    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0])
    return _cut(out[0, len(ids):].tolist(), eos)


def llama_greedy(llm, ids: list[int], max_new: int, eos: set[int]) -> list[int]:
    """llama.cpp's greedy continuation of ``ids`` (argmax of its own logits, up to an eos)."""
    llm.reset()
    llm.eval(ids)
    new: list[int] = []
    for _ in range(max_new):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        new.append(nxt)
        if nxt in eos:
            break
        llm.eval([nxt])
    return new


def _cut(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i + 1]
    return tokens


def chat_template_match(tok, template: str | None) -> bool | None:
    """GGUF template rendered by llama-cpp-python's Jinja formatter == transformers render."""
    if not getattr(tok, "chat_template", None):
        return None
    if template != tok.chat_template:
        return False
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    msgs = [{"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Hi! ¿Qué tal? 你好"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    fmt = Jinja2ChatFormatter(template=template, eos_token=tok.eos_token or "",
                              bos_token=tok.bos_token or "")
    ours = fmt(messages=msgs).prompt
    theirs = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return ours == theirs
