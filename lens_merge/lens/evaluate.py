"""Does Lens work? Base vs base+delta on held-out prompts (``lens_report.json``).

Measured per target language, base -> lens:
1. ``agnostic_cosine``: cosine between a target prompt's last-token state and its English
   parallel's, both with the language-specific subspace removed, (I - P_s) z; plus
   ``agnostic_gap``, the mean |u . z_l - u . z_en| the align term shrinks.
2. ``own_direction``: mean projection of target states on their unit direction delta_l / |delta_l|.
3. ``english_kl``: mean KL(base || lens) of next-token distributions over English prompts.
4. ``fidelity``: share of greedy replies (``max_new_tokens``) in the prompt's language.

One model is loaded; only the blocks the delta changes are held twice, and the blocks below
them run once per prompt batch for both (``lens_merge.lens._generate``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens_merge.data import PromptSet
from lens_merge.files import write_json_atomic
from lens_merge.lens._generate import Measured
from lens_merge.lens.langid import identify
from lens_merge.lens.probe import Subspace
from lens_merge.progress import NULL, Progress
from lens_merge.provenance import stamp, tool_info
from lens_merge.weights.delta import LensDelta

REPORT_NAME = "lens_report.json"
STATES_NAME = "mean_states.safetensors"


@dataclass
class EvalResult:
    """The report (JSON-ready) and each language's mean last-token state, base and lens."""

    report: dict[str, Any]
    mean_states: dict[str, Any]  # "base"/"lens" -> [L, d] tensors, languages in report order


def _metrics(states, subspace: Subspace, languages: list[str]) -> dict[str, dict[str, float]]:
    import torch

    sub = subspace.layer(-1)
    en = states[languages[0]].double()
    en_ag = en - sub.specific(en)
    out = {}
    for lang in languages[1:]:
        z = states[lang].double()
        z_ag = z - sub.specific(z)
        d = subspace.delta_of(lang).double()
        unit = d / d.norm().clamp(min=1e-12)
        out[lang] = {
            "agnostic_cosine": float(torch.nn.functional.cosine_similarity(z_ag, en_ag).mean()),
            "agnostic_gap": float((sub.agnostic_coord(z) - sub.agnostic_coord(en)).abs().mean()),
            "own_direction": float((z @ unit).mean()),
        }
    return out


def _fidelity(replies: dict[str, list[str]]) -> dict[str, float]:
    return {lang: (sum(identify(r) == lang for r in rs) / len(rs) if rs else float("nan"))
            for lang, rs in replies.items()}


def evaluate(
    model_dir: str | Path,
    delta: LensDelta,
    subspace: Subspace,
    prompts: PromptSet,
    max_length: int = 128,
    batch_size: int = 48,
    max_new_tokens: int = 32,
    chat_template: bool = True,
    progress: Progress = NULL,
    max_memory: int | str | None = None,
    dtype: str | None = "fp32",
    device: str = "cpu",
) -> EvalResult:
    """Compare the base model with base+delta on held-out prompts.

    One model is loaded; the blocks the delta changes are held twice (base and Lens) and every
    block below them is shared: each prompt batch is prefilled through them once (see
    ``lens_merge.lens._generate``).

    Args:
        model_dir: the base model's local directory.
        delta, subspace, prompts: the Lens delta, the probe's subspace, held-out prompts.
        max_length: max prompt tokens (left truncation).
        batch_size: most prompts per batch (languages mixed, sorted by length).
        max_new_tokens: greedy reply length for fidelity; 0 measures states and logits only.
        chat_template: wrap prompts in the chat template.
        progress: progress reporter.
        max_memory: bytes (or "2GB", "512MiB") a batch's KV caches, logits and prefill may
            take; None: half the free GPU memory or a quarter of the available RAM.
        dtype: the model's dtype (``fp32`` as the report always used; None keeps the
            checkpoint's).
        device: torch device string.

    Returns:
        ``EvalResult``: the report (what ``lens_report.json`` holds: per-language metrics for
        ``base`` and ``lens``, their means, English KL, sample replies, provenance) and the
        per-language mean states.
    """
    from lens_merge.architectures import for_config
    from lens_merge.lens._generate import LensBlocks, default_budget, measure
    from lens_merge.models import load_model, load_tokenizer
    from lens_merge.plan.machine import parse_size

    budget = parse_size(max_memory, "eval.max_memory") if max_memory is not None else None
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=dtype, device=device)
    blocks = LensBlocks(model, for_config(model.config.to_dict()), delta)
    base, lens, _ = measure(model, tok, blocks, prompts, max_length, batch_size, max_new_tokens,
                            chat_template, budget or default_budget(model.device), progress)
    return build_report(prompts, delta, subspace, max_new_tokens, base, lens)


def build_report(prompts: PromptSet, delta: LensDelta, subspace: Subspace,
                 max_new_tokens: int, base: Measured, lens: Measured) -> EvalResult:
    """The report and mean states from the two branches' measurements.

    Returns:
        ``EvalResult`` (see ``evaluate``).
    """
    import torch

    languages = list(prompts.languages)
    s_b, l_b, r_b = base.states, base.logits, base.replies
    s_l, l_l, r_l = lens.states, lens.logits, lens.replies
    kl = torch.nn.functional.kl_div(torch.log_softmax(l_l.double(), -1),
                                    torch.log_softmax(l_b.double(), -1),
                                    log_target=True, reduction="none").sum(-1)
    top1 = float((l_b.argmax(-1) == l_l.argmax(-1)).double().mean())
    m_b, m_l = _metrics(s_b, subspace, languages), _metrics(s_l, subspace, languages)
    f_b, f_l = _fidelity(r_b), _fidelity(r_l)
    per_lang = {}
    for lang in languages:
        row = {"fidelity_base": f_b.get(lang), "fidelity_lens": f_l.get(lang)}
        if lang in m_b:
            for k in m_b[lang]:
                row[f"{k}_base"] = m_b[lang][k]
                row[f"{k}_lens"] = m_l[lang][k]
        per_lang[lang] = row
    targets = languages[1:]

    def mean(key):
        vals = [per_lang[lang][key] for lang in targets if per_lang[lang].get(key) is not None]
        return sum(vals) / len(vals)

    summary = {k: {"base": mean(f"{k}_base"), "lens": mean(f"{k}_lens")}
               for k in ("agnostic_cosine", "agnostic_gap", "own_direction", "fidelity")}
    summary["english_kl"] = float(kl.mean())
    summary["english_kl_max"] = float(kl.max())
    summary["english_top1_agreement"] = top1
    summary["english_fidelity"] = {"base": f_b[languages[0]], "lens": f_l[languages[0]]}
    report = {
        "format": "lens-report", "format_version": 1,
        "languages": languages, "n_prompts": len(prompts), "source": prompts.source,
        "max_new_tokens": max_new_tokens,
        "summary": summary, "per_language": per_lang,
        "samples": {lang: {"prompt": prompts.texts(lang)[0], "base": r_b[lang][:1],
                           "lens": r_l[lang][:1]} for lang in languages} if max_new_tokens else {},
        "delta": {"tensors": len(delta.tensors), "blocks": delta.meta.get("blocks")},
        **stamp(), "tool": tool_info(),
    }
    means = {label: torch.stack([m.states[lang].mean(0) for lang in languages])
             for label, m in (("base", base), ("lens", lens))}
    return EvalResult(report, means)


def write_report(result: EvalResult, out_dir: str | Path) -> Path:
    """Write ``lens_report.json`` and ``mean_states.safetensors`` into ``out_dir``."""
    from lens_merge.files import atomic_file
    from lens_merge.weights.shard_writer import save_safetensors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / STATES_NAME) as tmp:  # ordinary permissions, same bytes each run
        save_safetensors(tmp, {k: v.float().contiguous()
                               for k, v in result.mean_states.items()},
                         {"languages": ",".join(result.report["languages"]),
                          "what": "mean last-token final state per language, held-out prompts"})
    p = out / REPORT_NAME
    write_json_atomic(p, result.report)
    return p


def effect_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The part of a report recorded in the delta's json as its measured effect."""
    return {"summary": report["summary"], "n_prompts": report["n_prompts"],
            "source": report["source"]}
