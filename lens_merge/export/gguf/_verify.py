"""``verify_gguf``: run the GGUF in real llama.cpp (CPU) and compare it with transformers.

For each prompt (chat template applied, as users will run it) both engines get the same token
ids. Measured: max |logit difference| over every position; top-1 agreement over every
distinct context (a prefix shared by several prompts, such as the chat template's system
prompt, counts once; the per-position figure is reported too); whether the greedy
continuation is identical (``generation_match``) and whether its first token is
(``first_token_agreement``); whether llama.cpp tokenizes the prompt like the HF tokenizer; and
whether the GGUF's chat template renders (with llama-cpp-python's Jinja formatter) exactly
what transformers renders. The limits are ``parity.thresholds.THRESHOLDS["gguf"][outtype]``;
the result is a ``records.ParityReport``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from lens_merge.errors import ExportError, VerificationError
from lens_merge.export.gguf._engines import (
    chat_template_match,
    generation_eos,
    gguf_facts,
    llama_greedy,
)
from lens_merge.export.gguf._quantize import require_llama_cpp
from lens_merge.parity.metrics import GenerationTally, first_mismatch, max_abs_diff, top1_same
from lens_merge.parity.prompts import parity_prompts
from lens_merge.parity.reference import References
from lens_merge.parity.thresholds import THRESHOLDS, checks_for, thresholds_for
from lens_merge.progress import NULL, Progress
from lens_merge.provenance import now_iso
from lens_merge.records import ParityReport, parity_report

KIND = "gguf"


def _limits(outtype: str | None, file_type: int | None, path: Path) -> dict[str, float]:
    try:
        return thresholds_for(KIND, str(outtype))
    except KeyError:
        raise ExportError(f"{path}: no verification thresholds for file type {file_type!r}; "
                          f"pass outtype= one of {', '.join(THRESHOLDS[KIND])}") from None


def _problems(tally: GenerationTally, template_match: bool | None) -> list[str]:
    out = []
    if tally.same_tokens < tally.n:
        out.append(f"llama.cpp tokenizes {tally.n - tally.same_tokens} of {tally.n} prompts "
                   "differently (pre-tokenizer or add_bos mismatch)")
    if template_match is False:
        out.append("the GGUF chat template renders differently from transformers")
    return out


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
    reference: References | None = None,
) -> ParityReport:
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
        raise_on_failure: raise VerificationError when the report fails.
        n_threads: llama.cpp CPU threads.
        reference: transformers' side of ``checkpoint`` (``parity.reference.References``),
            shared by calls on the same checkpoint, so verifying several output types (and
            the ONNX export) runs the reference model once per prompt; None: a fresh one.

    Returns:
        A ``ParityReport``: kind ``gguf``, variant the output type; metrics
        ``max_abs_logit_diff``, ``top1_agreement`` (distinct contexts),
        ``top1_agreement_all_positions``, ``generation_match``, ``first_token_agreement``,
        ``tokenization_match`` (shares of prompts), ``n_contexts``, ``n_positions``; the same
        per language; a tokenization or chat-template mismatch is a problem; ``details``:
        ``prompts`` (one row per prompt, both continuations decoded), ``chat_template_match``,
        ``max_new_tokens``, ``file_type``.

    Raises:
        VerificationError: (when ``raise_on_failure``) a check or problem fails the report;
            ``.report`` holds it.
        ExportError: llama-cpp-python missing, or the file type has no thresholds.
    """
    t0 = time.perf_counter()
    llama_cpp = require_llama_cpp("GGUF verification")
    from lens_merge.lens.hidden import format_prompt
    from lens_merge.models import load_tokenizer, resolve_model

    checkpoint = resolve_model(checkpoint)
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ExportError(f"{gguf_path}: no such GGUF file")
    items = parity_prompts(languages, per_language=prompts_per_language, prompts=prompts,
                           checkpoint=checkpoint, by_row=True)
    tok = load_tokenizer(checkpoint)
    templated = bool(getattr(tok, "chat_template", None))
    encoded = []
    for lang, text in items:
        shown = format_prompt(tok, text)
        encoded.append((lang, text, shown, tok(shown, add_special_tokens=not templated)
                        ["input_ids"]))
    n_ctx = max(len(e[3]) for e in encoded) + max_new_tokens + 16
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx,
                          n_threads=n_threads, n_threads_batch=n_threads, n_gpu_layers=0,
                          logits_all=True, verbose=False, seed=0)
    try:
        facts = gguf_facts(llm)
        if outtype is None:
            from lens_merge.export.gguf._types import outtype_for_file_type

            ft = facts["file_type"]
            ot = outtype_for_file_type(ft) if ft is not None else None
            outtype = ot.name if ot else None
        limits = _limits(outtype, facts["file_type"], gguf_path)
        eos = {i for i in (tok.eos_token_id, facts["eos"], facts["eot"]) if isinstance(i, int)}
        eos |= set(generation_eos(checkpoint))
        refs = References(checkpoint) if reference is None else reference
        try:
            total, per_lang, rows = _compare(llm, tok, encoded, max_new_tokens, eos,
                                             templated, refs, progress, gguf_path.name)
        finally:
            refs.close()  # the model, not the references
    finally:
        llm.close()
    template_match = chat_template_match(tok, facts["chat_template"])
    metrics = total.metrics()
    report = parity_report(
        KIND, gguf_path, checkpoint, checks=checks_for(limits, metrics),
        problems=_problems(total, template_match), variant=outtype, metrics=metrics,
        languages=sorted(per_lang), n_prompts=len(rows),
        per_language={k: {**v.metrics(), "n_prompts": v.n} for k, v in per_lang.items()},
        verified_at=now_iso(), seconds=round(time.perf_counter() - t0, 3),
        details={"prompts": rows, "chat_template_match": template_match,
                 "max_new_tokens": max_new_tokens, "file_type": facts["file_type"]})
    if not report.passed and raise_on_failure:
        raise VerificationError(f"{gguf_path.name}: GGUF verification failed: "
                                f"{'; '.join(report.failures)}", report)
    return report


def _compare(llm, tok, encoded: list, max_new_tokens: int, eos: set[int], templated: bool,
             refs: References, progress: Progress, label: str
             ) -> tuple[GenerationTally, dict[str, GenerationTally], list[dict[str, Any]]]:
    """Run every prompt through both engines; returns the totals, per language, and rows."""
    total, per_lang, rows = GenerationTally(), {}, []
    with progress.task(f"verify {label}", total=len(encoded)) as task:
        for lang, text, shown, ids in encoded:
            g = refs.get(ids, max_new_tokens, eos)
            ref, hf_gen = g.logits.numpy(), g.tokens
            llm.reset()
            llm.eval(ids)
            got = np.asarray(llm.scores[:len(ids)], dtype=np.float32)
            if got.shape != ref.shape:
                raise ExportError(f"{label}: llama.cpp logits {got.shape} vs transformers "
                                  f"{ref.shape}")
            same = top1_same(ref, got)
            llama_ids = llm.tokenize(shown.encode("utf-8"), add_bos=not templated,
                                     special=templated)
            plain_ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
            ll_gen = llama_greedy(llm, ids, max_new_tokens, eos)
            mismatch = first_mismatch(hf_gen, ll_gen)
            row = {"language": lang, "prompt": text, "n_tokens": len(ids),
                   "max_abs_logit_diff": max_abs_diff(ref, got),
                   "top1_agreement": sum(same) / len(same),
                   "tokenization_match": (llama_ids == ids and plain_ids ==
                                          tok(text, add_special_tokens=True)["input_ids"]),
                   "generation_match": mismatch is None,
                   "first_token_match": mismatch is None or mismatch > 0,
                   "first_mismatch": mismatch,
                   "transformers": tok.decode(hf_gen, skip_special_tokens=False),
                   "llama_cpp": tok.decode(ll_gen, skip_special_tokens=False)}
            # a context shared with an earlier prompt (the chat template's system prompt)
            # is counted once: one near-tie there must not weigh once per prompt
            row["n_new_contexts"], row["top1_same_new"] = total.add(ids, row, same)
            row["top1_same_all"] = sum(same)
            per_lang.setdefault(lang, GenerationTally()).add(ids, row, same)
            rows.append(row)
            task.advance(1, lang=lang, diff=row["max_abs_logit_diff"])
    return total, per_lang, rows
