"""``verify_gguf``: run the GGUF in real llama.cpp (CPU) and compare it with transformers.

For each prompt (chat template applied, as users will run it) both engines get the same token
ids. Measured: max |logit difference| over every position; top-1 agreement over every
distinct context (a prefix shared by several prompts, such as the chat template's system
prompt, counts once; the per-position figure is reported too); whether a 32-token greedy
continuation is identical; whether llama.cpp tokenizes the prompt like the HF tokenizer; and
whether the GGUF's chat template renders (with llama-cpp-python's Jinja formatter) exactly
what transformers renders.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from lens_merge.errors import ExportError, VerificationError
from lens_merge.export.gguf._quantize import require_llama_cpp
from lens_merge.progress import NULL, Progress

# Tolerances per output type. max_abs_logit_diff is over every prompt position (the first
# position, after <|im_start|>, carries the largest logits and the largest quantization error);
# top1_agreement is over every distinct context (a prefix several prompts share counts once:
# the trained Lens model of the default run has a 0.009 top-2 margin inside the chat template's
# system prompt, and f16 flipping that one near-tie in all 10 prompts read as 98.4%);
# generation_match is the fraction of prompts whose greedy continuation is token-for-token
# identical. Measured on the default model
# (SmolLM2-135M-Instruct folded after a Lens delta; llama.cpp's default f16 KV cache):
#
#   type    max|dlogit|  top-1   greedy same     type     max|dlogit|  top-1   greedy same
#   f32     0.054        1.000   3/3             q6_k     5.3          0.879   3/4
#   f16     0.118        1.000   10/10 (32 tok)  q5_k_m   13.8         0.821   1/4
#   bf16    0.54         0.996   3/4             q5_0     10.1         0.821   0/4
#   q8_0    2.49         0.946   3/4             q4_k_m   8.25         0.871   1/4
#   q8_0    2.74         0.941   6/10 (32 tok)   q4_0     22.5         0.549   0/4
#
# (4 prompts en/zh/ar/es with 16 new tokens unless noted; f16 and the second q8_0 row: all
# 10 default languages with 32 new tokens.)
# A 135M model is far more sensitive to 4-5 bit weights than the 1-8B models GGUF users run,
# so the low-bit rows are loose on purpose; f32/f16 are strict (f32: top-1 100%).
THRESHOLDS: dict[str, dict[str, float]] = {
    "f32": {"max_abs_logit_diff": 0.25, "top1_agreement": 1.0, "generation_match": 1.0},
    "f16": {"max_abs_logit_diff": 0.5, "top1_agreement": 0.99, "generation_match": 0.9},
    "bf16": {"max_abs_logit_diff": 2.0, "top1_agreement": 0.97, "generation_match": 0.5},
    "q8_0": {"max_abs_logit_diff": 5.0, "top1_agreement": 0.9, "generation_match": 0.3},
    "q6_k": {"max_abs_logit_diff": 10.0, "top1_agreement": 0.8, "generation_match": 0.25},
    "q5_k_m": {"max_abs_logit_diff": 20.0, "top1_agreement": 0.75, "generation_match": 0.0},
    "q5_1": {"max_abs_logit_diff": 20.0, "top1_agreement": 0.75, "generation_match": 0.0},
    "q5_0": {"max_abs_logit_diff": 20.0, "top1_agreement": 0.75, "generation_match": 0.0},
    "q4_k_m": {"max_abs_logit_diff": 20.0, "top1_agreement": 0.75, "generation_match": 0.0},
    "q4_1": {"max_abs_logit_diff": 35.0, "top1_agreement": 0.45, "generation_match": 0.0},
    "q4_0": {"max_abs_logit_diff": 35.0, "top1_agreement": 0.45, "generation_match": 0.0},
}


def _facts(llm) -> dict[str, Any]:
    """Scalar GGUF keys as llama.cpp itself read them."""
    md = llm.metadata

    def num(key):
        v = md.get(key)
        return int(v) if v is not None and str(v).lstrip("-").isdigit() else None

    return {"file_type": num("general.file_type"), "eos": num("tokenizer.ggml.eos_token_id"),
            "eot": num("tokenizer.ggml.eot_token_id"),
            "chat_template": md.get("tokenizer.chat_template")}


def _checkpoint_languages(checkpoint: Path) -> list[str] | None:
    from lens_merge.export.gguf._metadata import provenance_metadata

    return provenance_metadata(checkpoint).get("languages")


def _default_prompts(languages: list[str], per_language: int) -> list[tuple[str, str]]:
    from lens_merge.data import load_prompts

    ps = load_prompts("default", languages, split="heldout", max_samples=per_language)
    return [(lang, row[lang]) for row in ps.rows for lang in languages]


def _hf_greedy(model, ids: list[int], max_new: int, eos: set[int]) -> list[int]:
    import torch

    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             eos_token_id=sorted(eos), pad_token_id=sorted(eos)[0])
    return _cut(out[0, len(ids):].tolist(), eos)


def _llama_greedy(llm, ids: list[int], max_new: int, eos: set[int]) -> list[int]:
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


def _generation_eos(checkpoint: Path) -> list[int]:
    """The eos ids of the checkpoint's generation config (what transformers stops on)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(str(checkpoint)).eos_token_id
    except OSError:  # no generation_config.json: transformers falls back to the model config
        import json

        eos = json.loads((checkpoint / "config.json").read_text()).get("eos_token_id")
    return eos if isinstance(eos, list) else [eos] if eos is not None else []


def _cut(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i + 1]
    return tokens


def _chat_template_match(tok, template: str | None) -> bool | None:
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


def verify_gguf(
    checkpoint: str | Path,
    gguf_path: str | Path,
    languages: list[str] | None = None,
    prompts: list[str] | None = None,
    max_new_tokens: int = 32,
    progress: Progress = NULL,
    outtype: str | None = None,
    prompts_per_language: int = 1,
    raise_on_failure: bool = True,
    n_threads: int = 2,
    reference: dict | None = None,
) -> dict[str, Any]:
    """Compare a GGUF in llama.cpp (CPU) with the checkpoint in transformers.

    Args:
        checkpoint: the HF directory the GGUF was exported from (or ``default``).
        gguf_path: the GGUF file.
        languages: languages whose default held-out prompts are used (default: the Lens
            languages in the checkpoint's ``lens_merge.json``, else the default recipe's).
        prompts: explicit prompts instead (language reported as ``"custom"``).
        max_new_tokens: greedy continuation length per prompt.
        progress: one tick per prompt.
        outtype: thresholds to apply (default: read from ``general.file_type``).
        prompts_per_language: default prompts per language.
        raise_on_failure: raise VerificationError when a threshold is missed.
        n_threads: llama.cpp CPU threads.
        reference: a dict shared by calls on the same checkpoint: transformers' logits and
            greedy tokens are kept there per prompt, so verifying several output types of
            one checkpoint runs the reference model once.

    Returns:
        dict: max_abs_logit_diff, top1_agreement, generations_match {fraction, per_prompt},
        tokenization_match, chat_template_match, thresholds, passed, per-prompt rows.

    Raises:
        VerificationError: (when ``raise_on_failure``) a threshold is missed; ``.report``
            holds the dict.
        ExportError: llama-cpp-python missing, or the file type has no thresholds.
    """
    t0 = time.perf_counter()
    llama_cpp = require_llama_cpp("GGUF verification")
    from lens_merge.config import DEFAULT_LANGUAGES
    from lens_merge.hidden import format_prompt
    from lens_merge.models import load_model, load_tokenizer, resolve_model

    checkpoint = resolve_model(checkpoint)
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ExportError(f"{gguf_path}: no such GGUF file")
    if prompts is not None:
        items = [("custom", p) for p in prompts]
    else:
        langs = languages or _checkpoint_languages(checkpoint) or list(DEFAULT_LANGUAGES)
        items = _default_prompts(list(langs), prompts_per_language)
    tok = load_tokenizer(checkpoint)
    templated = bool(getattr(tok, "chat_template", None))
    encoded = []
    for lang, text in items:
        shown = format_prompt(tok, text)
        ids = tok(shown, add_special_tokens=not templated)["input_ids"]
        encoded.append((lang, text, shown, ids))
    n_ctx = max(len(e[3]) for e in encoded) + max_new_tokens + 16
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx,
                          n_threads=n_threads, n_threads_batch=n_threads, n_gpu_layers=0,
                          logits_all=True, verbose=False, seed=0)
    facts = _facts(llm)
    if outtype is None:
        from lens_merge.export.gguf._types import outtype_for_file_type

        ot = outtype_for_file_type(facts["file_type"]) if facts["file_type"] is not None else None
        outtype = ot.name if ot else None
    if outtype not in THRESHOLDS:
        llm.close()
        raise ExportError(f"{gguf_path}: no verification thresholds for file type "
                          f"{facts['file_type']!r}; pass outtype= one of {', '.join(THRESHOLDS)}")
    thresholds = THRESHOLDS[outtype]
    eos = {i for i in (tok.eos_token_id, facts["eos"], facts["eot"]) if isinstance(i, int)}
    gen_cfg = _generation_eos(checkpoint)
    eos |= set(gen_cfg)
    reference = {} if reference is None else reference
    model = None
    rows: list[dict[str, Any]] = []
    seen: set[tuple[int, ...]] = set()
    import torch

    try:
        with progress.task(f"verify {gguf_path.name}", total=len(encoded)) as task:
            for lang, text, shown, ids in encoded:
                key = (str(checkpoint), tuple(ids), max_new_tokens, tuple(sorted(eos)))
                if key not in reference:
                    if model is None:
                        model = load_model(checkpoint, dtype="fp32")
                    with torch.inference_mode():
                        logits = model(torch.tensor([ids])).logits[0].float().numpy()
                    reference[key] = (logits, _hf_greedy(model, ids, max_new_tokens, eos))
                ref, hf_gen = reference[key]
                llm.reset()
                llm.eval(ids)
                got = np.asarray(llm.scores[:len(ids)], dtype=np.float32)
                if got.shape != ref.shape:
                    raise ExportError(f"{gguf_path}: llama.cpp logits {got.shape} vs "
                                      f"transformers {ref.shape}")
                diff = float(np.abs(got - ref).max())
                same = got.argmax(-1) == ref.argmax(-1)
                # a context shared with an earlier prompt (the chat template's system prompt)
                # is counted once: one near-tie there must not weigh once per prompt
                fresh = np.array([tuple(ids[:p + 1]) not in seen for p in range(len(ids))])
                seen.update(tuple(ids[:p + 1]) for p in range(len(ids)))
                llama_ids = llm.tokenize(shown.encode("utf-8"), add_bos=not templated,
                                         special=templated)
                plain_ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
                tok_match = (llama_ids == ids and
                             plain_ids == tok(text, add_special_tokens=True)["input_ids"])
                ll_gen = _llama_greedy(llm, ids, max_new_tokens, eos)
                rows.append({"language": lang, "prompt": text, "n_tokens": len(ids),
                             "n_new_contexts": int(fresh.sum()),
                             "top1_same_new": int(same[fresh].sum()),
                             "top1_same_all": int(same.sum()),
                             "max_abs_logit_diff": diff,
                             "top1_agreement": float(same.mean()),
                             "tokenization_match": tok_match,
                             "generation_match": hf_gen == ll_gen,
                             "transformers": tok.decode(hf_gen, skip_special_tokens=False),
                             "llama_cpp": tok.decode(ll_gen, skip_special_tokens=False)})
                task.advance(1, lang=lang, diff=diff)
    finally:
        llm.close()
    n_pos = sum(r["n_tokens"] for r in rows)
    n_new = sum(r["n_new_contexts"] for r in rows)
    per_prompt = [r["generation_match"] for r in rows]
    report = {
        "gguf": str(gguf_path), "checkpoint": str(checkpoint), "outtype": outtype,
        "n_prompts": len(rows), "languages": sorted({r["language"] for r in rows}),
        "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows),
        "top1_agreement": sum(r["top1_same_new"] for r in rows) / max(n_new, 1),
        "top1_agreement_all_positions": sum(r["top1_same_all"] for r in rows) / n_pos,
        "n_contexts": n_new,
        "generations_match": {"fraction": sum(per_prompt) / len(rows),
                              "per_prompt": per_prompt},
        "tokenization_match": sum(r["tokenization_match"] for r in rows) / len(rows),
        "chat_template_match": _chat_template_match(tok, facts["chat_template"]),
        "thresholds": thresholds, "prompts": rows, "max_new_tokens": max_new_tokens,
    }
    failures = _failures(report, thresholds)
    report["passed"] = not failures
    report["failures"] = failures
    report["seconds"] = round(time.perf_counter() - t0, 3)
    if failures and raise_on_failure:
        raise VerificationError(f"{gguf_path.name}: GGUF verification failed: "
                                f"{'; '.join(failures)}", report)
    return report


def _failures(r: dict, th: dict[str, float]) -> list[str]:
    out = []
    if r["max_abs_logit_diff"] > th["max_abs_logit_diff"]:
        out.append(f"max |logit diff| {r['max_abs_logit_diff']:.4g} > "
                   f"{th['max_abs_logit_diff']}")
    if r["top1_agreement"] < th["top1_agreement"]:
        out.append(f"top-1 agreement {r['top1_agreement']:.4f} < {th['top1_agreement']}")
    if r["generations_match"]["fraction"] < th["generation_match"]:
        out.append(f"greedy generations match {r['generations_match']['fraction']:.2f} < "
                   f"{th['generation_match']}")
    if r["tokenization_match"] < 1.0:
        out.append(f"llama.cpp tokenizes {1 - r['tokenization_match']:.0%} of prompts "
                   "differently (pre-tokenizer or add_bos mismatch)")
    if r["chat_template_match"] is False:
        out.append("the GGUF chat template renders differently from transformers")
    return out
