"""Parity check of a PEFT LoRA adapter: ``PeftModel.from_pretrained(base, DIR)`` vs the
folded model (base + delta in memory, or a folded checkpoint), on the parity prompts.

Three numbers tell three things apart:

- ``max_abs_logit_diff`` / ``top1_agreement`` / ``kl_mean``: PEFT vs the folded model, what
  the user gets compared with the full Lens edit (rank truncation and dropped tensors show
  here);
- ``adapter_max_abs_logit_diff``: PEFT vs the base with the adapter's own files applied in
  memory (``_peft_layout.apply_adapter_files``): does PEFT read the folder as written, at any
  rank;
- ``dropped_max_abs_logit_diff`` / ``dropped_top1_agreement``: base + the delta without its
  dropped tensors vs the folded model, the cost of what the adapter could not carry.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lens_merge.adapters._peft_layout import (
    PARITY_FILE,
    apply_adapter_files,
    check_base,
    read_provenance,
)
from lens_merge.errors import AdapterError, VerificationError
from lens_merge.parity.metrics import max_abs_diff
from lens_merge.parity.prompts import parity_prompts
from lens_merge.parity.thresholds import checks_for, thresholds_for
from lens_merge.progress import NULL, Progress
from lens_merge.provenance import now_iso
from lens_merge.records import ParityReport, ParitySet, parity_report

if TYPE_CHECKING:
    from lens_merge.weights.delta import LensDelta

KIND = "lora"
_STORED = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _reference(folded: LensDelta | str | Path | None, prov) -> tuple[Any, Path | None]:
    """(the delta to apply in memory or None, the folded checkpoint directory or None)."""
    from lens_merge.weights._source import resolve_base
    from lens_merge.weights.delta import DELTA_META, LensDelta

    if isinstance(folded, LensDelta):
        return folded, None
    if folded is None:
        path = prov.delta.get("path")
        if not path or not (Path(path) / DELTA_META).is_file():
            raise AdapterError(f"the adapter records no readable delta ({path!r}); pass the "
                               "folded checkpoint or the delta to compare with")
        return LensDelta.load(path), None
    p = Path(folded)
    if (p / DELTA_META).is_file():
        return LensDelta.load(p), None
    return None, resolve_base(p)


def _with_delta(model, delta: LensDelta):
    from lens_merge.weights.delta import apply_delta

    apply_delta(model, delta)
    return model


def verify_peft_lora(
    base: str | Path,
    adapter_dir: str | Path,
    folded: LensDelta | str | Path | None = None,
    *,
    languages: list[str] | None = None,
    prompts: Sequence[str] | None = None,
    n_per_language: int = 2,
    max_length: int = 64,
    batch_size: int = 8,
    device: str = "cpu",
    raise_on_failure: bool = False,
    write_report: bool = True,
    progress: Progress = NULL,
) -> ParityReport:
    """Compare ``PeftModel.from_pretrained(base, adapter_dir)`` with the folded model (fp32).

    Args:
        base: ``default`` or the base checkpoint (checked against the adapter's recorded
            base sha256s).
        adapter_dir: the adapter folder ``export_peft_lora`` wrote.
        folded: the reference: a folded checkpoint directory, a delta (``LensDelta`` or its
            directory, applied to the base in memory), or None for the delta the adapter's
            provenance names.
        languages, prompts, n_per_language, max_length, batch_size: the parity prompts
            (default: the delta's languages, held-out rows).
        device: torch device.
        raise_on_failure: raise ``VerificationError`` when the report fails.
        write_report: write ``lens_merge_parity.json`` into the adapter folder.
        progress: progress reporter.

    Returns:
        A ``ParityReport`` (kind ``lora``; variant ``full_rank`` when every tensor is at full
        rank, nothing was dropped and the reference is fp32, else ``approximate``) with the
        metrics of the module docstring.

    Raises:
        AdapterError: a base other than the adapter's, no reference to compare with.
        VerificationError: (with ``raise_on_failure``) a failed check.
    """
    import torch

    try:
        from peft import PeftModel
    except ImportError:
        raise AdapterError("verifying a PEFT adapter needs PEFT: pip install "
                           "'lens-merge[lora]'") from None

    from lens_merge.files import write_json_atomic
    from lens_merge.memory import release_memory
    from lens_merge.models import load_model, load_tokenizer
    from lens_merge.parity.logits import prompt_logits
    from lens_merge.weights._source import resolve_base
    from lens_merge.weights.checkpoint import Checkpoint
    from lens_merge.weights.delta import LensDelta
    from lens_merge.weights.verify import LogitTally

    t0 = time.perf_counter()
    adapter = Path(adapter_dir)
    prov = read_provenance(adapter)
    base_dir = resolve_base(base)
    check_base(base_dir, prov.base_tensors, f"adapter {adapter}")
    delta, folded_dir = _reference(folded, prov)
    if folded_dir is not None:
        ck = Checkpoint.open(folded_dir)
        ref_dtype = _STORED.get(ck.entry(ck.tensor_names()[0]).dtype, "other")
    else:
        ref_dtype = "float32"
    langs = list(languages or prov.delta.get("languages") or ["en"])
    items = parity_prompts(langs, per_language=n_per_language, prompts=prompts, by_row=False)
    if not items:
        raise AdapterError("no prompts to compare")
    tok = load_tokenizer(base_dir)
    problems: list[str] = []
    passes = 3 + bool(prov.dropped and delta is not None)

    def run(load, task, visit=None):
        """Logits of the model ``load()`` builds (kept, or given to ``visit``); the model is
        freed before the next one loads."""
        model = load().to(device).eval()
        res = prompt_logits(model, tok, items, max_length, batch_size, device, task, visit)
        del model
        release_memory()
        return res

    def with_adapter():
        own = load_model(base_dir, dtype="fp32")
        problems.extend(apply_adapter_files(own, adapter))
        return own

    def peft_model():
        try:
            return PeftModel.from_pretrained(load_model(base_dir, dtype="fp32"), str(adapter))
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = " ".join(str(exc).split())[:300]
            raise AdapterError(f"{adapter}: PEFT cannot load it ({type(exc).__name__}: "
                               f"{first})") from None

    total, per_lang, drop_tally, rows = LogitTally(), {}, LogitTally(), []
    adapter_diff = [0.0]
    held: dict[str, list] = {}  # the kept passes: "ref" and "got" (PEFT)

    def vs_peft(i: int, _ids: list[int], own_logits) -> None:
        a_diff = max_abs_diff(own_logits, held["got"][i][1])
        rows[i]["adapter_max_abs_logit_diff"] = a_diff
        adapter_diff[0] = max(adapter_diff[0], a_diff)

    def vs_ref(i: int, ids: list[int], logits) -> None:
        total_add(drop_tally, None, ids, held["ref"][i][1], logits)

    # one model in memory at a time (base + delta, PEFT, base + the adapter's files, the
    # delta without what the adapter dropped); two passes' logits kept, the others compared
    # with them as they come
    with progress.task("verify lora", passes * len(items)) as task:
        if delta is not None:
            held["ref"] = run(lambda: _with_delta(load_model(base_dir, dtype="fp32"), delta),
                              task)
        else:
            held["ref"] = run(lambda: load_model(folded_dir, dtype="fp32"), task)
        held["got"] = run(peft_model, task)
        for i, (lang, text) in enumerate(items):
            ids, r = held["ref"][i]
            g = held["got"][i][1]
            diff = total_add(total, per_lang.setdefault(lang, LogitTally()), ids, r, g)
            rows.append({"language": lang, "prompt": text, "n_tokens": len(ids),
                         "max_abs_logit_diff": diff, "adapter_max_abs_logit_diff": None,
                         "top1_agreement": float((r.argmax(-1) == g.argmax(-1)).float().mean())})
        run(with_adapter, task, visit=vs_peft)
        del held["got"]
        dropped = prov.dropped and delta is not None
        if dropped:
            kept = LensDelta(tensors={n: t for n, t in delta.tensors.items()
                                      if n not in prov.dropped}, meta=delta.meta)
            run(lambda: _with_delta(load_model(base_dir, dtype="fp32"), kept), task,
                visit=vs_ref)
        held.clear()
    exact = all(t.get("rank") == t.get("full_rank") for t in prov.tensors.values())
    variant = "full_rank" if exact and not prov.dropped and ref_dtype == "float32" \
        else "approximate"
    metrics: dict[str, Any] = {**total.metrics(), "adapter_max_abs_logit_diff": adapter_diff[0],
                               "size_ratio": prov.sizes.get("ratio")}
    if dropped:
        dm = drop_tally.metrics()
        metrics |= {"dropped_max_abs_logit_diff": dm["max_abs_logit_diff"],
                    "dropped_top1_agreement": dm["top1_agreement"]}
    report = parity_report(
        KIND, adapter, f"{base_dir} + delta" if delta is not None else folded_dir,
        checks=checks_for(thresholds_for(KIND, variant), metrics), problems=problems,
        variant=variant, metrics=metrics, languages=langs,
        per_language={k: v.metrics() for k, v in per_lang.items()}, n_prompts=len(rows),
        verified_at=now_iso(), seconds=round(time.perf_counter() - t0, 3),
        details={"base": str(base), "reference_dtype": ref_dtype, "max_rank": prov.max_rank,
                 "request": prov.request, "sizes": prov.sizes,
                 "tensors": {n: {k: t[k] for k in ("rank", "full_rank", "rel_error")}
                             for n, t in prov.tensors.items()},
                 "carried": prov.carried, "dropped": prov.dropped, "prompts": rows,
                 "torch": torch.__version__})
    if write_report:
        write_json_atomic(adapter / PARITY_FILE, ParitySet(reports=[report]).dump())
    if not report.passed and raise_on_failure:
        raise VerificationError(f"{adapter}: LoRA adapter verification failed ({variant}): "
                                f"{'; '.join(report.failures)}", report)
    return report


def total_add(total, lang_tally, ids: list[int], ref, got) -> float:
    """Add one prompt's comparison to the tallies; returns its max |logit diff|."""
    from lens_merge.parity.metrics import kl_per_position, top1_same

    diff, same, kl = max_abs_diff(ref, got), top1_same(ref, got), kl_per_position(ref, got)
    total.add(ids, diff, same, kl)
    if lang_tally is not None:
        lang_tally.add(ids, diff, same, kl)
    return diff
