"""``verify_onnx``: an ONNX export in ONNX Runtime against its checkpoint in transformers.

The result is a ``records.ParitySet``: one ``ParityReport`` for the fp graph (kind ``onnx``,
variant its dtype) and one for ``model_int8.onnx`` (variant ``int8``) when it exists. Limits
come from ``parity.thresholds`` (``onnx`` rows); the set is stored in the folder's
``lens_merge_export.json`` as ``verification``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from lens_merge.errors import VerificationError
from lens_merge.export.onnx._compare import (
    TOLERANCES,
    Reference,
    Tally,
    check_int8,
    check_prompt,
    encode,
    geometry_problem,
    load_ort,
)
from lens_merge.export.onnx._record import (
    GRAPH,
    INT8_GRAPH,
    PROVENANCE_FILE,
    changed_files,
    graph_files,
    read_export_record,
    record_exporter,
)
from lens_merge.export.onnx.compat import require_optimum
from lens_merge.files import write_json_atomic
from lens_merge.parity.prompts import parity_prompts
from lens_merge.parity.reference import References, generation_eos
from lens_merge.parity.thresholds import checks_for, thresholds_for
from lens_merge.progress import NULL, Progress
from lens_merge.provenance import now_iso
from lens_merge.records import ParityReport, ParitySet, parity_report

__all__ = ["TOLERANCES", "int8_variant", "verify_onnx"]


def int8_variant(method: str | None) -> str:
    """The ``onnx`` thresholds row of an int8 graph made with ``method``."""
    return "int8_dynamic" if method == "dynamic" else "int8"


def verify_onnx(
    checkpoint: str | Path,
    out_dir: str | Path,
    languages: list[str] | None = None,
    prompts: list[str] | None = None,
    max_new_tokens: int = 32,
    tolerance: float | None = None,
    progress: Progress = NULL,
    prompts_per_language: int = 1,
    raise_on_failure: bool = True,
    reference: References | None = None,
) -> ParitySet:
    """Compare an ONNX export in ONNX Runtime with the checkpoint in transformers.

    For each prompt (chat template applied, batch 1): full-sequence logits of
    ``ORTModelForCausalLM`` vs transformers (eager attention, fp32), then greedy generation
    of ``max_new_tokens`` on both (ORT through its KV cache) compared token by token, with the
    per-step logits. The int8 graph, when present, is compared with the same fp32 reference
    (top-1 agreement over distinct contexts, KL). The result is written into the folder's
    provenance file as ``verification``.

    Args:
        checkpoint: the HF directory the folder was exported from (``default`` accepted).
        out_dir: the export folder.
        languages: languages whose default held-out prompts are used (default: the Lens
            languages of the checkpoint's ``lens_merge.json``, else the default recipe's).
        prompts: explicit prompts instead (language reported as ``custom``).
        max_new_tokens: greedy continuation length.
        tolerance: a fixed max |logit diff|; default per prompt
            ``max(atol, rtol * max|reference logit|)`` from ``TOLERANCES[dtype]``.
        progress: one tick per prompt.
        prompts_per_language: default prompts per language.
        raise_on_failure: raise VerificationError (carrying the ParitySet) on failure.
        reference: transformers' side of ``checkpoint`` (``parity.reference.References``),
            shared with other checks of it (the GGUF verification); None: a fresh one.

    Returns:
        The ``ParitySet`` (also stored in ``lens_merge_export.json``): the fp graph's report
        first, then the int8 graph's when there is one.

    Raises:
        VerificationError: when a check fails and ``raise_on_failure``.
        ExportError: when the folder is not a lens-merge ONNX export.
    """
    import torch

    from lens_merge.memory import release_memory
    from lens_merge.models import load_tokenizer, resolve_model

    require_optimum("ONNX verification")
    out = Path(out_dir)
    rec = read_export_record(out)
    src = resolve_model(checkpoint)
    dtype = rec.get("options", {}).get("dtype", "fp32")
    quant = rec.get("quantized")
    t0 = time.perf_counter()
    changed = changed_files(out, rec)
    items = parity_prompts(languages or None, prompts_per_language, prompts or None,
                           checkpoint=src)
    tok_ref, tok = load_tokenizer(src), load_tokenizer(out)
    # one model in memory at a time: transformers first (its logits and greedy steps are
    # kept), then the fp graph, then the int8 graph
    t = Tally()
    with progress.task("onnx verify", total=(2 + bool(quant)) * len(items)) as bar:
        eos = generation_eos(src) or [tok.eos_token_id]
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        source = References(src) if reference is None else reference
        refs = []
        try:
            for lang, text in items:
                enc = encode(tok, text)
                if not torch.equal(enc["input_ids"], encode(tok_ref, text)["input_ids"]):
                    t.tok_mismatch += 1
                ids = enc["input_ids"][0].tolist()
                g = source.get(ids, max_new_tokens, eos)
                refs.append(Reference(lang, enc, ids, g.logits, g.tokens, g.steps))
                bar.advance()
        finally:
            source.close()  # the model, not the references
        fp = load_ort(out, None)  # what users get from from_pretrained(DIR)
        problems = []
        if fp.path.name != GRAPH:
            problems.append(f"from_pretrained({out}) loads {fp.path.name}, not {GRAPH}")
        geo = geometry_problem(fp)
        if geo:  # generation would crash inside ORT: record the failure and stop here
            problems.append(f"{geo}; the export cannot generate with its KV cache")
            reports = [_stopped(out / GRAPH, src, dtype, problems)]
            if quant:
                reports.append(_stopped(out / quant["file"], src, "int8",
                                        ["not compared: " + geo]))
            return _finish(out, rec, ParitySet(reports=reports), raise_on_failure)
        for r in refs:
            diff = check_prompt(t, r, fp, dtype, tolerance, max_new_tokens, eos, pad)
            bar.advance(max_abs=diff)
        del fp
        release_memory()
        if quant:
            q = load_ort(out, quant["file"])
            for r in refs:
                check_int8(t, r, q, max_new_tokens, eos, pad)
                bar.advance()
            del q
            release_memory()
    seconds = time.perf_counter() - t0
    reports = [_fp_report(t, out, src, dtype, tolerance, max_new_tokens, changed, problems,
                          seconds - t.q_seconds)]
    reports[0].details["exporter"] = record_exporter(rec)
    if quant:
        reports.append(_int8_report(t, out, src, rec, changed))
    return _finish(out, rec, ParitySet(reports=reports), raise_on_failure)


def _stopped(subject: Path, src: Path, variant: str, problems: list[str]) -> ParityReport:
    return parity_report("onnx", subject, src, checks=[], problems=problems, variant=variant,
                         verified_at=now_iso())


def _finish(out: Path, rec: dict[str, Any], result: ParitySet,
            raise_on_failure: bool) -> ParitySet:
    """Store the result in the provenance file; raise when it failed (and asked to)."""
    rec["verification"] = result.dump()
    write_json_atomic(out / PROVENANCE_FILE, rec)
    if not result.passed and raise_on_failure:
        m, n = result.reports[0].metrics, result.reports[0].n_prompts
        numbers = (f" (max |logit diff| {m['max_abs_logit_diff']:.3g}, greedy equal "
                   f"{m['generations_equal']}/{n})" if "max_abs_logit_diff" in m else "")
        raise VerificationError(
            f"{out}: ONNX verification failed: {'; '.join(result.failures)}{numbers}; the "
            f"folder is kept and marked failed in {PROVENANCE_FILE}", result)
    return result


def _fp_report(t: Tally, out: Path, src: Path, dtype: str, tolerance: float | None,
               max_new: int, changed: list[str], problems: list[str],
               seconds: float) -> ParityReport:
    n = len(t.gens)
    n_equal = sum(g["equal"] for g in t.gens)
    n_ok = sum(g["equal"] or g["tie"] for g in t.gens)
    if changed:
        problems.append(f"files changed since export: {', '.join(changed)}")
    if t.tok_mismatch:
        problems.append(f"exported tokenizer encodes {t.tok_mismatch}/{n} prompts "
                        "differently from the checkpoint's")
    metrics = {
        "max_abs_logit_diff": max(d["max_abs_logit_diff"] for d in t.fp.per_lang.values()),
        "tolerance": min(d["tolerance"] for d in t.fp.per_lang.values()),
        "worst_diff_to_tolerance": t.worst,
        "kv_step_max_abs_logit_diff": max(g["kv_step_max_abs_logit_diff"] for g in t.gens),
        "kv_step_worst_diff_to_tolerance": t.kv_worst,
        **_agreement(t.fp, n),
        "generation_match": n_equal / n, "generation_match_with_ties": n_ok / n,
        "generations_equal": n_equal, "generations_tie_excused": n_ok - n_equal,
    }
    rule = {"fixed": tolerance} if tolerance is not None else dict(TOLERANCES[dtype])
    details = {
        "dtype": dtype, "graph": GRAPH, "tolerance_rule": rule, "max_new_tokens": max_new,
        "reference": "transformers fp32 (eager attention)",
        "files_unchanged": not changed, "changed_files": changed,
        "tokenizer_match": t.tok_mismatch == 0,
        "greedy_mismatches": [f"{g['language']}@{g['first_mismatch']}" for g in t.gens
                              if not g["equal"]],
        "generations": t.gens,
    }
    return parity_report(
        "onnx", out / GRAPH, src, checks=checks_for(thresholds_for("onnx", dtype), metrics),
        problems=problems, variant=dtype, metrics=metrics, languages=list(t.fp.per_lang),
        per_language=t.fp.per_lang, n_prompts=n, verified_at=now_iso(),
        seconds=round(seconds, 3), details=details)


def _int8_report(t: Tally, out: Path, src: Path, rec: dict[str, Any],
                 changed: list[str]) -> ParityReport:
    quant = rec["quantized"]
    name = quant.get("file", INT8_GRAPH)
    problems = []
    mine = [k for k in changed if k in graph_files(name, rec.get("files", {}))]
    if mine:
        problems.append(f"files changed since export: {', '.join(mine)}")
    if not all(math.isfinite(x) for x in t.q.kl):
        problems.append("int8 graph gives non-finite logits")
    n = len(t.q_prefix)
    metrics = {
        **_agreement(t.q, n),
        "generation_match": t.q_equal / max(n, 1), "generations_equal": t.q_equal,
        "generation_prefix_match_mean": sum(t.q_prefix) / max(n, 1),
        "bytes": quant.get("bytes"), "fp_bytes": rec.get("graph_bytes"),
        "size_ratio_to_fp": quant.get("size_ratio_to_fp"),
    }
    per_language = {lang: {"kl_mean": d["kl_sum"] / max(d["positions"], 1),
                           "prompts": d["prompts"], "generations_equal": d["generations_equal"]}
                    for lang, d in t.q.per_lang.items()}
    method = quant.get("method")
    return parity_report(
        "onnx", out / name, src,
        checks=checks_for(thresholds_for("onnx", int8_variant(method)), metrics),
        problems=problems, variant="int8", metrics=metrics, languages=list(per_language),
        per_language=per_language, n_prompts=n, verified_at=now_iso(),
        seconds=round(t.q_seconds, 3),
        details={"file": name, "method": method, "thresholds": int8_variant(method),
                 "reference": "transformers fp32 logits (the fp32 model)"})


def _agreement(g: Any, n_prompts: int) -> dict[str, Any]:
    """Top-1 (distinct contexts and every position), KL and first-token numbers of a graph."""
    return {"top1_agreement": g.contexts.agreement,
            "top1_agreement_all_positions": g.contexts.agreement_all_positions,
            "kl_mean": sum(g.kl) / max(len(g.kl), 1), "kl_max": max(g.kl, default=0.0),
            "first_token_agreement": g.first_token_same / max(n_prompts, 1),
            "n_contexts": g.contexts.n, "n_positions": g.contexts.n_all}
