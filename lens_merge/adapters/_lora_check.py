"""``verify_gguf_lora``: a LoRA adapter GGUF on its base GGUF vs the folded GGUF, both in
llama.cpp (CPU), on the same token ids (the GGUF's own chat template).

Measured: max |logit difference| over every position; top-1 agreement over distinct contexts;
whether the greedy continuation is identical, and its first token; and, as context, the same
numbers for the base without the adapter (how far the edit moves the base towards the folded
model). Limits: ``parity.thresholds.THRESHOLDS["gguf_lora"][type]``, the type being the GGUF
type both files share.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from lens_merge.adapters import _llama
from lens_merge.errors import AdapterError, VerificationError
from lens_merge.progress import NULL, Progress
from lens_merge.records import ParityReport, parity_report

KIND = "gguf_lora"


def _gguf_header(path: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(scalar keys, tensor name -> ggml ne) of a GGUF, read with gguf's own reader."""
    from gguf import GGUFReader

    if not path.is_file():
        raise AdapterError(f"{path}: no such GGUF file")
    try:
        r = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - the reader's own errors
        raise AdapterError(f"{path}: not a GGUF file ({type(exc).__name__}: {exc})") from None
    keys = {k: f.contents() for k, f in r.fields.items()
            if not k.startswith(("GGUF.", "tokenizer.ggml.")) and len(f.types) == 1}
    return keys, {t.name: tuple(int(x) for x in t.shape.tolist()) for t in r.tensors}


def check_adapter_fits(base_gguf: str | Path, adapter_gguf: str | Path) -> int:
    """Check, before llama.cpp sees them, that a LoRA GGUF fits a base GGUF the way
    llama.cpp's loader requires (some llama-cpp-python builds crash instead of refusing).

    Returns:
        The number of lora_a/lora_b pairs.

    Raises:
        AdapterError: not a LoRA adapter, another architecture, a pair naming no base tensor
            or of the wrong shape, an unpaired tensor.
    """
    base_gguf, adapter_gguf = Path(base_gguf), Path(adapter_gguf)
    bk, bt = _gguf_header(base_gguf)
    ak, at = _gguf_header(adapter_gguf)
    if ak.get("general.type") != "adapter" or ak.get("adapter.type") != "lora":
        raise AdapterError(f"{adapter_gguf}: not a LoRA adapter (general.type "
                           f"{ak.get('general.type')!r}, adapter.type {ak.get('adapter.type')!r})")
    if ak.get("general.architecture") != bk.get("general.architecture"):
        raise AdapterError(f"{adapter_gguf} is a {ak.get('general.architecture')} adapter, "
                           f"{base_gguf} a {bk.get('general.architecture')} model")
    names = {n.rsplit(".", 1)[0] for n in at}
    for name in sorted(names):
        a, b = at.get(name + ".lora_a"), at.get(name + ".lora_b")
        if a is None or b is None:
            raise AdapterError(f"{adapter_gguf}: tensor {name} lacks its lora_a or lora_b")
        w = bt.get(name)
        if w is None:
            raise AdapterError(f"{adapter_gguf}: {name} is not a tensor of {base_gguf} (another "
                               "model)")
        if len(w) != 2 or w[0] != a[0] or w[1] != b[1] or a[1] != b[0]:
            raise AdapterError(f"{adapter_gguf}: {name} pair a{list(a)} b{list(b)} does not fit "
                               f"{base_gguf}'s {list(w)} (ggml order; another model)")
    return len(names)


def _run(path: Path, encoded: list, max_new: int, eos: set[int], n_ctx: int, n_threads: int,
         lora: Path | None = None, scale: float = 1.0, greedy: bool = True):
    """(type label, n_vocab, [(logits, greedy tokens, their text)] per prompt) of one run."""
    from lens_merge.export.gguf._engines import llama_greedy

    llm = _llama.open_llama(path, n_ctx, n_threads, lora_path=lora, lora_scale=scale)
    try:
        out = []
        for _, _, ids in encoded:
            logits = _llama.scores(llm, ids)
            gen = llama_greedy(llm, ids, max_new, eos) if greedy else []
            out.append((logits, gen, _llama.decode(llm, gen)))
        return _llama.file_type_label(llm), int(llm.n_vocab()), out
    finally:
        llm.close()


def _encode_prompts(folded: Path, items: list[tuple[str, str]], n_threads: int
                    ) -> tuple[list[tuple[str, str, list[int]]], set[int]]:
    """Token ids of each prompt through the folded GGUF's chat template, and its eos ids."""
    llm = _llama.open_llama(folded, 512, n_threads)
    try:
        return [(lang, text, _llama.gguf_prompt_ids(llm, text)) for lang, text in items], \
            _llama.eos_ids(llm)
    finally:
        llm.close()


def verify_gguf_lora(
    base_gguf: str | Path,
    adapter_gguf: str | Path,
    folded_gguf: str | Path,
    *,
    languages: Sequence[str] | None = None,
    prompts: Sequence[str] | None = None,
    prompts_per_language: int = 1,
    max_new_tokens: int = 32,
    scale: float = 1.0,
    baseline: bool = True,
    raise_on_failure: bool = True,
    n_threads: int = 2,
    progress: Progress = NULL,
) -> ParityReport:
    """Compare base GGUF + LoRA adapter with the folded GGUF in llama.cpp.

    Args:
        base_gguf: the base model's GGUF (f16/f32 from our exporter, or a quantized file the
            user has, such as the default model's original Q4_1).
        adapter_gguf: the adapter (``export_gguf_lora``).
        folded_gguf: the folded checkpoint exported to the same GGUF type as ``base_gguf``.
        languages, prompts, prompts_per_language: which prompts (``parity.parity_prompts``;
            default: the default recipe's languages, one held-out row each).
        max_new_tokens: greedy continuation length per prompt.
        scale: the adapter's run-time scale (llama.cpp's ``--lora-scaled F S``).
        baseline: also measure the base without the adapter vs the folded GGUF (metrics
            ``baseline_max_abs_logit_diff``, ``baseline_top1_agreement``; never checked).
        raise_on_failure: raise VerificationError when the report fails.
        n_threads: llama.cpp CPU threads.
        progress: one tick per prompt and run.

    Returns:
        A ``ParityReport``: kind ``gguf_lora``, variant the GGUF type; metrics
        ``max_abs_logit_diff``, ``top1_agreement`` (distinct contexts),
        ``top1_agreement_all_positions``, ``generation_match``, ``first_token_agreement``;
        the same per language; one row per prompt (both continuations decoded).

    Raises:
        VerificationError: (when ``raise_on_failure``) a check failed; ``.report`` holds it.
        AdapterError: llama.cpp refuses a file or the adapter (wrong base architecture or
            shapes), the two models differ in type or vocabulary, or the type has no limits.
    """
    from lens_merge.parity.prompts import parity_prompts
    from lens_merge.parity.thresholds import checks_for
    from lens_merge.provenance import now_iso

    t0 = time.perf_counter()
    base_gguf, adapter_gguf, folded_gguf = Path(base_gguf), Path(adapter_gguf), Path(folded_gguf)
    check_adapter_fits(base_gguf, adapter_gguf)
    items = parity_prompts(languages, per_language=prompts_per_language, prompts=prompts)
    encoded, eos = _encode_prompts(folded_gguf, items, n_threads)
    n_ctx = max(len(e[2]) for e in encoded) + max_new_tokens + 16
    plain = None
    with progress.task(f"verify {adapter_gguf.name}", total=2 + int(baseline)) as task:
        ref_type, ref_vocab, ref = _run(folded_gguf, encoded, max_new_tokens, eos, n_ctx,
                                        n_threads)
        limits = _llama.adapter_limits(KIND, ref_type, folded_gguf)
        task.advance(1)
        got_type, got_vocab, got = _run(base_gguf, encoded, max_new_tokens, eos, n_ctx,
                                        n_threads, lora=adapter_gguf, scale=scale)
        task.advance(1)
        if ref_type != got_type or ref_vocab != got_vocab:
            raise AdapterError(f"{base_gguf} ({got_type}, {got_vocab} tokens) and {folded_gguf} "
                               f"({ref_type}, {ref_vocab} tokens) must be the same type and "
                               "vocabulary: export the folded model with the base's type")
        if baseline:
            plain = _run(base_gguf, encoded, max_new_tokens, eos, n_ctx, n_threads,
                         greedy=False)[2]
            task.advance(1)
    rows = []
    for i, (lang, text, ids) in enumerate(encoded):
        row, same = _llama.compare_row(lang, text, ids, ref[i][0], got[i][0], ref[i][1],
                                       got[i][1], (ref[i][2], got[i][2]))
        rows.append((ids, row, same))
    total, per_lang = _llama.tally_rows(rows)
    metrics: dict[str, float | int | None] = dict(total.metrics())
    if plain is not None:
        from lens_merge.parity.metrics import DistinctContexts, max_abs_diff, top1_same

        ctx = DistinctContexts()
        for i, (_, _, ids) in enumerate(encoded):
            ctx.add(ids, top1_same(ref[i][0], plain[i][0]))
        metrics["baseline_max_abs_logit_diff"] = max(
            max_abs_diff(ref[i][0], plain[i][0]) for i in range(len(encoded)))
        metrics["baseline_top1_agreement"] = ctx.agreement
    report = parity_report(
        KIND, adapter_gguf, folded_gguf, checks=checks_for(limits, metrics), variant=got_type,
        metrics=metrics, languages=sorted(per_lang), n_prompts=len(rows),
        per_language={k: v.metrics() for k, v in per_lang.items()}, verified_at=now_iso(),
        seconds=round(time.perf_counter() - t0, 3),
        details={"prompts": [r for _, r, _ in rows], "base_gguf": str(base_gguf),
                 "scale": scale, "max_new_tokens": max_new_tokens})
    if not report.passed and raise_on_failure:
        raise VerificationError(f"{adapter_gguf.name}: LoRA GGUF verification failed: "
                                f"{'; '.join(report.failures)}", report)
    return report

