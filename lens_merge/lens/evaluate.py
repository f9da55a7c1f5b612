"""Does Lens work? Base vs base+delta on held-out prompts (``lens_report.json``).

Measured per target language, base -> lens:
1. ``agnostic_cosine``: cosine between a target prompt's last-token state and its English
   parallel's, both with the language-specific subspace removed, (I - P_s) z; plus
   ``agnostic_gap``, the mean |u . z_l - u . z_en| the align term shrinks.
2. ``own_direction``: mean projection of target states on their unit direction delta_l / |delta_l|.
3. ``english_kl``: mean KL(base || lens) of next-token distributions over English prompts.
4. ``fidelity``: share of greedy replies (``max_new_tokens``) in the prompt's language.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens_merge.data import PromptSet
from lens_merge.files import write_json_atomic
from lens_merge.lens.hidden import batches, encode
from lens_merge.lens.langid import identify
from lens_merge.lens.probe import Subspace
from lens_merge.progress import NULL, Progress
from lens_merge.provenance import stamp, tool_info
from lens_merge.weights.delta import LensDelta, apply_delta

REPORT_NAME = "lens_report.json"
STATES_NAME = "mean_states.safetensors"


@dataclass
class EvalResult:
    """The report (JSON-ready) and each language's mean last-token state, base and lens."""

    report: dict[str, Any]
    mean_states: dict[str, Any]  # "base"/"lens" -> [L, d] tensors, languages in report order


def _measure(model, tok, prompts: PromptSet, max_length: int, batch_size: int,
             max_new_tokens: int, chat_template: bool, progress: Progress, label: str):
    """Final last-token states, English next-token logits and greedy replies.

    One prefill per batch: with generation on, the prompt's states and the first-token logits
    come from ``generate``'s own prefill step instead of a second forward.
    """
    import torch

    langs = list(prompts.languages)
    items = [(lang, text) for lang in langs for text in prompts.texts(lang)]
    zs: dict[str, list] = {lang: [] for lang in langs}
    rs: dict[str, list[str]] = {lang: [] for lang in langs}
    ls = []
    # Languages share batches: a decode step costs about the same for 8 or 48 rows on a CPU
    # (it is bound by reading the weights), so bigger batches make generation much cheaper.
    with torch.inference_mode(), progress.task(f"eval {label}", total=len(items)) as task:
        for chunk in batches(items, batch_size):
            enc = encode(tok, [text for _, text in chunk], max_length, chat_template)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            if max_new_tokens > 0:
                gen = model.generate(input_ids=enc["input_ids"],
                                     attention_mask=enc["attention_mask"],
                                     max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id,
                                     output_hidden_states=True, output_logits=True,
                                     return_dict_in_generate=True)
                z, first = gen.hidden_states[0][-1][:, -1], gen.logits[0]
                new = gen.sequences[:, enc["input_ids"].shape[1]:]
                replies = tok.batch_decode(new, skip_special_tokens=True)
            else:
                out = model(**enc, output_hidden_states=True, use_cache=False,
                            logits_to_keep=1)
                z, first = out.hidden_states[-1][:, -1], out.logits[:, -1]
                replies = []
            # copies, not views: a view would keep the whole batch's [B, T, d] states alive
            z, first = z.float().cpu().clone(), first.float().cpu().clone()
            for i, (lang, _) in enumerate(chunk):
                zs[lang].append(z[i])
                if replies:
                    rs[lang].append(replies[i])
                if lang == langs[0]:
                    ls.append(first[i])
            task.advance(len(chunk))
    states = {lang: torch.stack(zs[lang]) for lang in langs}
    return states, torch.stack(ls), rs


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
) -> EvalResult:
    """Compare the base model with base+delta on held-out prompts.

    Returns:
        ``EvalResult``: the report (what ``lens_report.json`` holds: per-language metrics for
        ``base`` and ``lens``, their means, English KL, sample replies, provenance) and the
        per-language mean states.
    """
    import torch

    from lens_merge.models import load_model, load_tokenizer

    languages = list(prompts.languages)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype="fp32")
    res = {}
    for label in ("base", "lens"):
        if label == "lens":
            apply_delta(model, delta)
        res[label] = _measure(model, tok, prompts, max_length, batch_size, max_new_tokens,
                              chat_template, progress, label)
    (s_b, l_b, r_b), (s_l, l_l, r_l) = res["base"], res["lens"]
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
    means = {label: torch.stack([res[label][0][lang].mean(0) for lang in languages])
             for label in ("base", "lens")}
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
