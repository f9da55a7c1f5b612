"""Does Lens work? Base vs base+delta (and a steering baseline) on held-out prompts.

``lens_report.json`` (format_version 2), per target language and branch b (``base``, ``steer``
when steering is on, ``lens``):
1. ``agnostic_cosine_b``: cosine between a target prompt's last-token state and its English
   parallel's, both with the language-specific subspace removed, (I - P_s) z; plus
   ``agnostic_gap_b``, the mean |u . z_l - u . z_en| the align term shrinks.
2. ``own_direction_b``: mean projection of target states on their unit direction delta_l/|delta_l|.
3. ``lpr_b`` (line-level pass rate, LCB; echoes fail: ``fidelity.line_pass_rate``) with
   ``lpr_ci_b`` (Wilson 95%), ``echo_b`` (share of replies that copy the prompt) and
   ``fidelity_b`` (whole-reply identification by lingua) with ``fidelity_ci_b``.
4. ``first_token_mass_b``: mean probability mass at the first reply position on the language's
   indicative tokens (``fidelity.indicative_tokens`` on the training prompts).
English: ``english_kl`` (mean KL(base || lens) of next-token distributions), top-1 agreement,
``english_identical_replies`` (greedy replies token-identical to the base's), English fidelity
and LPR per branch. ``summary.steering``: the alphas and how they were chosen (``steer``).

One model is loaded; only the blocks the delta changes are held twice, and the blocks below
them run once per prompt batch for every branch (``lens_merge.lens._generate``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lens_merge.data import PromptSet
from lens_merge.files import write_json_atomic
from lens_merge.lens._generate import Measured
from lens_merge.lens.fidelity import line_pass_rate, wilson
from lens_merge.lens.langid import LanguageId
from lens_merge.lens.probe import Subspace
from lens_merge.progress import NULL, Progress
from lens_merge.provenance import stamp, tool_info
from lens_merge.weights.delta import LensDelta

REPORT_NAME = "lens_report.json"
STATES_NAME = "mean_states.safetensors"
FORMAT_VERSION = 2
BRANCHES = ("base", "steer", "lens")


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


def _reply_rates(m: Measured, prompts: PromptSet, lid: LanguageId) -> dict[str, dict]:
    """Per language: fidelity, LPR and echo of one branch's replies, with counts."""
    out = {}
    for lang, rs in m.replies.items():
        if not rs:
            nan = float("nan")
            out[lang] = {"fidelity": nan, "fidelity_ci": None, "lpr": nan, "lpr_ci": None,
                         "echo": nan, "n": 0, "passed": 0, "echoes": 0, "identified": 0}
            continue
        lpr = line_pass_rate(rs, prompts.texts(lang), lang, lid)
        k = sum(lid.identify(r) == lang for r in rs)
        out[lang] = {"fidelity": k / len(rs), "fidelity_ci": list(wilson(k, len(rs))),
                     "lpr": lpr["rate"], "lpr_ci": list(lpr["ci"]), "echo": lpr["echo"],
                     "n": len(rs), "passed": lpr["passed"], "echoes": lpr["echoes"],
                     "identified": k}
    return out


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
    train_prompts: PromptSet | None = None,
    steering: bool = False,
    steering_alphas: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0),
    steering_rows: int = 16,
    steering_tokens: int = 16,
    english_extra: PromptSet | None = None,
) -> EvalResult:
    """Compare the base model with base+delta (and the steering baseline) on held-out prompts.

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
        train_prompts: training prompts (never the held-out ones), every language of
            ``prompts``: the indicative tokens of the first-token mass come from them, and
            steering's alphas are chosen on their first ``steering_rows`` rows. None: no
            first-token mass and no steering.
        steering: add the steering baseline (``lens_merge.lens.steer``) as a third branch.
        steering_alphas, steering_rows, steering_tokens: its alpha grid, the training rows
            per language and reply tokens alpha is chosen with.
        english_extra: more held-out English prompts (English only, none of ``prompts``'):
            the English checks (KL, top-1 agreement, identical replies) run on ``prompts``'
            English rows and these, so that one changed prompt is a smaller step than 1/16.

    Returns:
        ``EvalResult``: the report (what ``lens_report.json`` holds: per-language metrics per
        branch, their means, English KL and reply agreement, steering's alphas, sample
        replies, provenance) and the per-language mean states.
    """
    from lens_merge.architectures import for_config
    from lens_merge.errors import ConfigError
    from lens_merge.lens._generate import LensBlocks, default_budget, measure
    from lens_merge.lens.fidelity import indicative_tokens
    from lens_merge.models import load_model, load_tokenizer
    from lens_merge.plan.machine import parse_size

    budget = parse_size(max_memory, "eval.max_memory") if max_memory is not None else None
    languages = list(prompts.languages)
    if steering and train_prompts is None:
        raise ConfigError("eval.steering: the steering baseline chooses alpha on training "
                          "prompts; pass train_prompts (or turn steering off)")
    if train_prompts is not None and not set(languages) <= set(train_prompts.languages):
        raise ConfigError(f"train_prompts: languages {list(train_prompts.languages)} lack some "
                          f"of the eval's {languages}")
    if english_extra is not None and list(english_extra.languages) != languages[:1]:
        raise ConfigError(f"english_extra: English prompts only ({languages[0]!r}); got "
                          f"languages {list(english_extra.languages)}")
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype=dtype, device=device)
    blocks = LensBlocks(model, for_config(model.config.to_dict()), delta)
    budget = budget or default_budget(model.device)
    token_ids = (indicative_tokens(tok, {lang: train_prompts.texts(lang) for lang in languages},
                                   english=languages[0]) if train_prompts is not None else None)
    vectors, steer_info = None, None
    if steering:
        from lens_merge.lens import steer

        dirs, info = steer.directions(subspace, languages[1:], blocks.first)
        rows = PromptSet(train_prompts.languages, train_prompts.rows[:steering_rows],
                         train_prompts.source)
        chosen = steer.choose_alphas(
            model, tok, blocks, rows, dirs, list(steering_alphas), token_ids,
            LanguageId(languages), max_length=max_length, batch_size=batch_size,
            chat_template=chat_template, budget=budget, new_tokens=steering_tokens,
            progress=progress)
        vectors = {lang: a * dirs[lang] for lang, a in chosen["alpha"].items() if a > 0}
        steer_info = {**info, "alpha": chosen["alpha"],
                      "chosen_on": f"the first {len(rows)} training rows per language "
                                   f"({train_prompts.source}), greedy replies of "
                                   f"{steering_tokens} tokens; no eval row",
                      "rule": steer.RULE, "note": steer.NOTE.format(layer=blocks.first),
                      "rounds": chosen["rounds"], "base_on_rows": chosen["base"],
                      "grid": chosen["grid"]}
    got, _ = measure(model, tok, blocks, prompts, max_length, batch_size, max_new_tokens,
                     chat_template, budget, progress, token_ids=token_ids, steer=vectors)
    extra = None
    if english_extra is not None and len(english_extra):
        extra, _ = measure(model, tok, blocks, english_extra, max_length, batch_size,
                           max_new_tokens, chat_template, budget, progress)
    return build_report(prompts, delta, subspace, max_new_tokens, got, steer_info, extra)


def build_report(prompts: PromptSet, delta: LensDelta, subspace: Subspace,
                 max_new_tokens: int, measured: dict[str, Measured],
                 steering: dict[str, Any] | None = None,
                 english_extra: dict[str, Measured] | None = None) -> EvalResult:
    """The report and mean states from the branches' measurements.

    Args:
        measured: ``base`` and ``lens`` (and ``steer``) measurements (``_generate.measure``).
        steering: how steering's alphas were chosen (``summary.steering``), when it ran.
        english_extra: ``base`` and ``lens`` measurements of more English prompts, counted in
            the English KL, top-1 and identical replies (steering leaves English prompts
            unsteered: its branch takes the base's).

    Returns:
        ``EvalResult`` (see ``evaluate``).
    """
    import torch

    languages = list(prompts.languages)
    en, targets = languages[0], languages[1:]
    labels = [b for b in BRANCHES if b in measured]
    lid = LanguageId(languages)
    base = measured["base"]
    geo = {b: _metrics(measured[b].states, subspace, languages) for b in labels}
    rates = {b: _reply_rates(measured[b], prompts, lid) for b in labels}
    per_lang: dict[str, dict[str, Any]] = {}
    for lang in languages:
        row: dict[str, Any] = {}
        for b in labels:
            r = rates[b][lang]
            row |= {f"fidelity_{b}": r["fidelity"], f"fidelity_ci_{b}": r["fidelity_ci"],
                    f"lpr_{b}": r["lpr"], f"lpr_ci_{b}": r["lpr_ci"], f"echo_{b}": r["echo"]}
            mass = measured[b].mass.get(lang)
            row[f"first_token_mass_{b}"] = float(mass.mean()) if mass is not None else None
            row |= {f"{k}_{b}": v for k, v in geo[b].get(lang, {}).items()}
        per_lang[lang] = row

    def mean(key: str) -> float | None:
        vals = [per_lang[lang][key] for lang in targets if per_lang[lang].get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    def pooled(b: str, k: str) -> list[float] | None:
        n = sum(rates[b][lang]["n"] for lang in targets)
        return list(wilson(sum(rates[b][lang][k] for lang in targets), n)) if n else None

    summary: dict[str, Any] = {
        k: {b: mean(f"{k}_{b}") for b in labels}
        for k in ("agnostic_cosine", "agnostic_gap", "own_direction", "fidelity", "lpr",
                  "echo", "first_token_mass")}
    summary["lpr_ci"] = {b: pooled(b, "passed") for b in labels}
    summary["fidelity_ci"] = {b: pooled(b, "identified") for b in labels}

    more = english_extra or {}

    def english(b: str) -> dict[str, Any]:
        parts = [(base, measured[b])]
        if more:
            parts.append((more["base"], more["lens" if b == "lens" else "base"]))
        lb = torch.cat([x.logits.double() for x, _ in parts])
        lo = torch.cat([y.logits.double() for _, y in parts])
        kl = torch.nn.functional.kl_div(torch.log_softmax(lo, -1), torch.log_softmax(lb, -1),
                                        log_target=True, reduction="none").sum(-1)
        top1 = int((lb.argmax(-1) == lo.argmax(-1)).sum())
        ids_b = [r for x, _ in parts for r in x.reply_ids.get(en, [])]
        ids_o = [r for _, y in parts for r in y.reply_ids.get(en, [])]
        same = sum(x == y for x, y in zip(ids_b, ids_o, strict=True))
        n_rep = len(ids_b)
        return {"n": len(kl), "kl": float(kl.mean()), "kl_max": float(kl.max()),
                "top1": top1 / len(kl),
                "top1_ci": list(wilson(top1, len(kl))),
                "same": same / n_rep if n_rep else float("nan"),
                "same_ci": list(wilson(same, n_rep)) if n_rep else None}

    e = english("lens")
    summary |= {"english_prompts": e["n"],
                "english_kl": e["kl"], "english_kl_max": e["kl_max"],
                "english_top1_agreement": e["top1"], "english_top1_agreement_ci": e["top1_ci"],
                "english_identical_replies": e["same"],
                "english_identical_replies_ci": e["same_ci"],
                "english_fidelity": {b: rates[b][en]["fidelity"] for b in labels},
                "english_lpr": {b: rates[b][en]["lpr"] for b in labels},
                "english_lpr_ci": {b: rates[b][en]["lpr_ci"] for b in labels}}
    if "steer" in measured:
        es = english("steer")
        summary |= {"english_kl_steer": es["kl"], "english_top1_agreement_steer": es["top1"],
                    "english_identical_replies_steer": es["same"]}
        summary["steering"] = steering or {}
        from lens_merge.lens.steer import versus

        summary["steering_vs_lens"] = versus(summary)
    report = {
        "format": "lens-report", "format_version": FORMAT_VERSION,
        "languages": languages, "n_prompts": len(prompts), "source": prompts.source,
        "max_new_tokens": max_new_tokens, "branches": labels,
        "summary": summary, "per_language": per_lang,
        "samples": {lang: {"prompt": prompts.texts(lang)[0],
                           **{b: measured[b].replies[lang][:1] for b in labels}}
                    for lang in languages} if max_new_tokens else {},
        "delta": {"tensors": len(delta.tensors), "blocks": delta.meta.get("blocks")},
        **stamp(), "tool": tool_info(),
    }
    means = {label: torch.stack([measured[label].states[lang].mean(0) for lang in languages])
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
    summary = dict(report["summary"])
    if isinstance(summary.get("steering"), dict):  # the alphas, not the per-alpha grid
        summary["steering"] = {k: v for k, v in summary["steering"].items()
                               if k not in ("grid", "base_on_rows")}
    return {"summary": summary, "n_prompts": report["n_prompts"], "source": report["source"]}
