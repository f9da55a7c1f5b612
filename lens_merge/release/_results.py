"""The card's Results section, from ``report/lens_report.json``: the geometry summary, and for
a format_version 2 report the language-fidelity table (base / steering / Lens), the English
table and which of steering and Lens is better at matched English KL."""

from __future__ import annotations

import math
from typing import Any

_SUMMARY_ROWS = (
    ("agnostic_cosine", "Cosine to the English parallel, language-specific part removed", "up"),
    ("agnostic_gap", "Gap to English along the language-agnostic direction", "down"),
    ("own_direction", "Projection on the language's own direction", "up"),
    ("fidelity", "Replies in the prompt's language (target languages)", "up"),
    ("english_fidelity", "English replies in English", "up"),
)

def fmt(x: Any, pct: bool = False) -> str:
    """A number for a table: ``n/a`` for None/NaN, percent or 4 significant digits."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if not isinstance(x, int | float):
        return str(x)
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    if pct:
        return f"{100 * x:.1f}%"
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) >= 1):
        return str(int(x))
    return f"{x:.3g}" if abs(x) < 1e-3 and x != 0 else f"{x:.4f}"


def results(info: dict) -> list[str]:
    rep = info["report"]
    lines = ["## Results", ""]
    if not rep:
        return lines + ["No evaluation report (`report/lens_report.json`) in this release.", ""]
    s = rep.get("summary") or {}
    lines += [f"Held-out prompts: {rep.get('n_prompts', '?')} per language from "
              f"`{rep.get('source', '?')}`; greedy replies of {rep.get('max_new_tokens', '?')} "
              "tokens. Base model vs this model (`report/lens_report.json`).", "",
              "| Metric | Base | Lens | Better |", "|---|---|---|---|"]
    for key, label, better in _SUMMARY_ROWS:
        v = s.get(key)
        if isinstance(v, dict):
            pct = "fidelity" in key
            lines.append(f"| {label} | {fmt(v.get('base'), pct)} | {fmt(v.get('lens'), pct)} "
                         f"| {'higher' if better == 'up' else 'lower'} |")
    for key, label in (("english_kl", "English next-token KL(base ‖ Lens), mean"),
                       ("english_kl_max", "English next-token KL, max"),
                       ("english_top1_agreement", "English top-1 agreement with the base")):
        if key in s:
            pct = key.endswith("agreement")
            lines.append(f"| {label} | | {fmt(s[key], pct)} | "
                         f"{'higher' if pct else 'lower'} |")
    per = rep.get("per_language") or {}
    if per:
        lines += ["", "| Language | Fidelity base | Fidelity Lens | Agnostic cos base "
                  "| Agnostic cos Lens | Own direction base | Own direction Lens |",
                  "|---|---|---|---|---|---|---|"]
        for lang, r in per.items():
            lines.append(f"| `{lang}` | {fmt(r.get('fidelity_base'), True)} | "
                         f"{fmt(r.get('fidelity_lens'), True)} | "
                         f"{fmt(r.get('agnostic_cosine_base'))} | "
                         f"{fmt(r.get('agnostic_cosine_lens'))} | "
                         f"{fmt(r.get('own_direction_base'))} | "
                         f"{fmt(r.get('own_direction_lens'))} |")
    lines.append("")
    lines += _fidelity_tables(rep)
    if info["pictures"].get("report/losses.png"):
        lines += ["![Lens training loss terms per optimizer step](report/losses.png)", ""]
    return lines


def _rate(x: Any, ci: Any = None) -> str:
    """A rate in percent, with its interval when there is one: ``62.5% (38.6-81.5)``."""
    if not isinstance(ci, list | tuple) or len(ci) != 2:
        return fmt(x, True)
    return f"{fmt(x, True)} ({100 * ci[0]:.1f}-{100 * ci[1]:.1f})"


def _fidelity_tables(rep: dict) -> list[str]:
    """Report v2: per language, LPR / echo / first-token mass of base, steering and Lens; the
    English numbers of steering and Lens; the comparison at matched English KL."""
    s, per = rep.get("summary") or {}, rep.get("per_language") or {}
    if (rep.get("format_version") or 1) < 2 or not per:
        return []
    bs = [b for b in ("base", "steer", "lens") if b in (rep.get("branches") or ("base", "lens"))]
    name = {"base": "base", "steer": "steering", "lens": "Lens"}
    names = " / ".join(name[b] for b in bs)
    lines = ["Language fidelity on the same held-out prompts: LPR (line-level pass rate as in "
             "the Language Confusion Benchmark, lingua identifying each line; a reply that "
             "copies the prompt is an echo and fails; 95% Wilson interval), echo share and the "
             "first reply token's probability mass on the language's indicative tokens.", "",
             "| Language | " + " | ".join(f"LPR {name[b]}" for b in bs)
             + f" | Echo ({names}) | First-token mass ({names}) |",
             "|---" * (len(bs) + 3) + "|"]
    rows = [(f"`{lang}`", r, {b: r.get(f"lpr_ci_{b}") for b in bs}) for lang, r in per.items()]
    mean = {f"{k}_{b}": (s.get(k) or {}).get(b) for k in ("lpr", "echo", "first_token_mass")
            for b in bs}
    rows.append(("mean (targets)", mean, {b: (s.get("lpr_ci") or {}).get(b) for b in bs}))
    for label, r, ci in rows:
        lines.append(f"| {label} | " + " | ".join(_rate(r.get(f"lpr_{b}"), ci[b]) for b in bs)
                     + " | " + " / ".join(fmt(r.get(f"echo_{b}"), True) for b in bs)
                     + " | " + " / ".join(fmt(r.get(f"first_token_mass_{b}")) for b in bs)
                     + " |")
    eb = [b for b in bs if b != "base"]
    sfx = {"steer": "_steer", "lens": ""}
    n_en = s.get("english_prompts")
    head = f"English ({n_en} held-out prompts), vs the base" if n_en else "English, vs the base"
    lines += ["", f"| {head} | " + " | ".join(name[b] for b in eb) + " |",
              "|---" * (len(eb) + 1) + "|"]
    for label, key, pct in (("Next-token KL(base ‖ ·), mean", "english_kl", False),
                            ("Top-1 agreement", "english_top1_agreement", True),
                            ("Greedy replies identical to the base's",
                             "english_identical_replies", True)):
        lines.append(f"| {label} | " + " | ".join(
            _rate(s.get(key + sfx[b]), s.get(key + "_ci") if b == "lens" else None) if pct
            else fmt(s.get(key + sfx[b])) for b in eb) + " |")
    lines.append("| English replies in English (LPR; base "
                 f"{fmt((s.get('english_lpr') or {}).get('base'), True)}) | "
                 + " | ".join(fmt((s.get("english_lpr") or {}).get(b), True) for b in eb) + " |")
    lines.append("")
    return lines + _versus_line(s)


def _versus_line(s: dict) -> list[str]:
    """Which of steering and Lens is better at matched English KL, from the report's numbers."""
    v, st = s.get("steering_vs_lens"), s.get("steering") or {}
    if not isinstance(v, dict):
        return []
    kl, lpr, m = v.get("english_kl") or {}, v.get("lpr") or {}, v.get("first_token_mass") or {}
    alphas = ", ".join(f"`{k}` {a:g}" for k, a in (st.get("alpha") or {}).items())
    nums = (f"mean LPR steering {fmt(lpr.get('steer'), True)} vs Lens "
            f"{fmt(lpr.get('lens'), True)}, first-token mass {fmt(m.get('steer'))} vs "
            f"{fmt(m.get('lens'))}, English KL {fmt(kl.get('steer'))} vs {fmt(kl.get('lens'))}")
    better = {"lens": "**Lens is better**", "steer": "**steering is better**",
              "tie": "steering and Lens tie"}.get(v.get("better"))
    tol = fmt(v.get("kl_tolerance"))
    if v.get("matched"):
        verdict = f"At matched English KL (within {tol} nats) {better}: {nums}."
    elif better:
        verdict = (f"English KLs differ by more than {tol} nats; {better} (lower English KL "
                   f"and not worse on the target languages): {nums}.")
    else:
        verdict = (f"Not comparable at matched English KL (they differ by more than {tol} "
                   f"nats) and neither is better on both: {nums}.")
    note = (f" Steering: alpha {alphas} at block {st.get('layer')}, chosen on "
            f"{st.get('chosen_on')}; {st.get('note')}") if st else ""
    return [verdict + note, ""]
