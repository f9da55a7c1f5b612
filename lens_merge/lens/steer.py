"""The steering baseline beside Lens: DiffMean-style activation steering, no training.

For a prompt in target language l, ``alpha_l * delta_l`` is added to the residual stream
entering block N-K (the lowest block the delta changes) at every position, prompt and reply;
the weights are the base's. ``delta_l = P_s(m_l - m_en)`` is the probe's direction of l at that
layer: the probe stores ``hidden_states[1:]`` (``Subspace.layers[k]`` is ``hidden_states[k+1]``),
so block N-K's input is ``Subspace.layers[N-K-1]``.

Steering must be told the prompt's language at inference; English prompts are not steered (its
English numbers are the base's). Lens needs no language at inference.

``alpha_l`` is chosen per language on training rows (never the eval rows) from a grid:

1. the first-reply-token mass on l's indicative tokens for every alpha (each batch prefilled
   once and held; then only the top K blocks and one step per alpha), and the base's greedy
   replies;
2. the candidates: the grid alphas up to the one of highest mass, keeping those whose mass
   beats the base's; they are bisected for the largest one whose greedy replies
   (``new_tokens``) are not degenerate, degeneracy taken to grow with alpha (a degenerate alpha
   rules out the larger ones): at most ceil(log2(candidates + 1)) reply rounds, every
   language's trial in the same round. Degenerate: LPR (echoes fail) below the base's on the
   same rows, or a mean distinct-token ratio (distinct ids / ids of a reply, 0 for an empty
   one) under ``MIN_DISTINCT``. No candidate passes: alpha 0 (l not steered).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from lens_merge.progress import NULL, Progress

if TYPE_CHECKING:
    import torch

    from lens_merge.data import PromptSet
    from lens_merge.lens._generate import LensBlocks
    from lens_merge.lens.langid import LanguageId
    from lens_merge.lens.probe import Subspace

KL_MATCH = 0.01  # nats: English KLs this close count as matched (steering vs Lens)
MIN_DISTINCT = 0.3  # mean distinct-token ratio below which replies count as degenerate
NOTE = ("steering adds alpha_l * delta_l to the input of block {layer} for prompts of language "
        "l, so it must be told the prompt's language at inference; English prompts are not "
        "steered (its English numbers are the base's). Lens needs no language at inference.")
RULE = ("per language, among the grid alphas up to the one of highest first-token target mass "
        "and with more mass than the base, the largest whose greedy replies on the rows are not "
        "degenerate (bisection, degeneracy taken to grow with alpha); degenerate: LPR (echoes "
        f"fail) below the base's or mean distinct-token ratio < {MIN_DISTINCT}; none: alpha 0")


def directions(subspace: Subspace, languages: list[str],
               layer: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The probe's direction of each language at the input of block ``layer``.

    Args:
        subspace: the probe output.
        languages: target languages (English, the reference, has none).
        layer: the block whose input is steered (N-K).

    Returns:
        ``({lang: [d] fp32 delta_l}, info)``; ``info`` names the block, the probe layer and,
        when the probe lacks the exact layer (block 0's input, the embeddings, is not probed),
        a note saying the nearest one is used.
    """
    k, note = layer - 1, None
    if k < 0:
        k, note = 0, ("the probe has no hidden_states[0] (block 0's input); the nearest, "
                      "hidden_states[1] (block 0's output), is used")
    vecs = {lang: subspace.delta_of(lang, k).float() for lang in languages}
    info = {"layer": layer, "probe_layer": f"hidden_states[{k + 1}]"}
    return vecs, info | ({"probe_layer_note": note} if note else {})


def distinct_ratio(ids: tuple[int, ...]) -> float:
    """Distinct token ids over token ids of one reply; 0.0 for an empty reply."""
    return len(set(ids)) / len(ids) if ids else 0.0


def _judge(g: dict, at: list[int], lang: str, texts: list[str], lid: LanguageId) -> dict:
    from lens_merge.lens.fidelity import line_pass_rate

    lpr = line_pass_rate([g["reply"][i] for i in at], texts, lang, lid)
    return {"lpr": lpr["rate"], "echo": lpr["echo"],
            "distinct": sum(distinct_ratio(g["ids"][i]) for i in at) / len(at)}


def choose_alphas(model, tok, blocks: LensBlocks, rows: PromptSet,
                  vectors: dict[str, torch.Tensor], alphas: list[float],
                  token_ids: dict[str, list[int]], lid: LanguageId, *, max_length: int,
                  batch_size: int, chat_template: bool, budget: int, new_tokens: int = 16,
                  progress: Progress = NULL) -> dict[str, Any]:
    """Each language's alpha on ``rows`` (see the module rule).

    Args:
        model, tok, blocks: the base model, its tokenizer, the Lens blocks (for N-K and the
            shared-prefill machinery; the Lens copies are not run).
        rows: training prompts (never eval rows), every language of ``vectors``.
        vectors: language -> delta_l at block N-K's input (``directions``).
        alphas: the grid (positive).
        token_ids: language -> indicative token ids (``fidelity.indicative_tokens``).
        lid: the language identifier for LPR.
        max_length, batch_size, chat_template, budget: as ``_generate.measure``.
        new_tokens: greedy reply tokens of the degeneracy check.

    Returns:
        ``{"alpha": {lang: a}, "base": {lang: {first_token_mass, lpr, echo, distinct}},
        "grid": {lang: [{alpha, first_token_mass, lpr, echo, distinct, degenerate}]},
        "rounds": reply rounds run}``; an alpha never generated with has None for the reply
        numbers.
    """
    from lens_merge.lens._generate import Branch, Runner, row_bytes

    grid_alphas = sorted({float(a) for a in alphas})
    langs = list(vectors)
    items = [(lang, t) for lang in langs for t in rows.texts(lang)]
    at = {lang: [i for i, it in enumerate(items) if it[0] == lang] for lang in langs}
    size = row_bytes(model.config, next(model.parameters()).element_size(), max_length,
                     new_tokens)
    # every batch's prefill held across the rounds when all rows fit the budget at once
    runner = Runner(model, tok, blocks, items, max_length, batch_size, chat_template, budget,
                    new_tokens, keep=len(items) * size <= budget)
    first = [Branch("base", new_tokens=new_tokens)] + [
        Branch(f"{a:g}", steer={lang: a * v for lang, v in vectors.items()}, new_tokens=0)
        for a in grid_alphas]
    got = runner.run(first, new_tokens, token_ids, progress=progress,
                     what="steering alphas: first-token mass")

    def mass(g: dict, lang: str) -> float:
        return sum(g["mass"][i] for i in at[lang]) / len(at[lang])

    base = {lang: {"first_token_mass": mass(got["base"], lang),
                   **_judge(got["base"], at[lang], lang, rows.texts(lang), lid)}
            for lang in langs}
    grid = {lang: [{"alpha": a, "first_token_mass": mass(got[f"{a:g}"], lang), "lpr": None,
                    "echo": None, "distinct": None, "degenerate": None} for a in grid_alphas]
            for lang in langs}
    cands = {}
    for lang in langs:  # the alphas up to the mass peak whose mass beats the base's
        peak = max(range(len(grid_alphas)), key=lambda j: grid[lang][j]["first_token_mass"])
        cands[lang] = [r for r in grid[lang][:peak + 1]
                       if r["first_token_mass"] > base[lang]["first_token_mass"]]
    lo = {lang: 0 for lang in langs}
    hi = {lang: len(cands[lang]) - 1 for lang in langs}
    chosen, rounds = {lang: 0.0 for lang in langs}, 0
    while pending := [lang for lang in langs if lo[lang] <= hi[lang]]:
        trying = {lang: cands[lang][(lo[lang] + hi[lang]) // 2] for lang in pending}
        branch = Branch("try", steer={lang: trying[lang]["alpha"] * vectors[lang]
                                      for lang in pending}, new_tokens=new_tokens)
        g = runner.run([branch], new_tokens, progress=progress, what="steering alphas: replies",
                       wanted={i for lang in pending for i in at[lang]})["try"]
        rounds += 1
        for lang in pending:
            r, mid = trying[lang], (lo[lang] + hi[lang]) // 2
            r.update(_judge(g, at[lang], lang, rows.texts(lang), lid))
            r["degenerate"] = bool(r["lpr"] < base[lang]["lpr"] or r["distinct"] < MIN_DISTINCT)
            if r["degenerate"]:
                hi[lang] = mid - 1
            else:
                chosen[lang], lo[lang] = r["alpha"], mid + 1
    return {"alpha": chosen, "base": base, "grid": grid, "rounds": rounds}


def versus(s: dict[str, Any]) -> dict[str, Any]:
    """Steering vs Lens at matched English KL (within ``KL_MATCH``): the one with the higher
    mean target LPR, then first-token mass, is better; unmatched, the one with the lower KL
    wins only if it is not worse on both, else no winner.

    Args:
        s: the report's summary (``lpr``, ``first_token_mass``, ``english_kl``,
            ``english_kl_steer``).

    Returns:
        ``{"kl_tolerance", "english_kl", "matched", "better" ("lens", "steer", "tie" or
        None), "lpr", "first_token_mass"}``.
    """
    kl = {"steer": s["english_kl_steer"], "lens": s["english_kl"]}

    def score(b: str) -> tuple[float, float]:
        return tuple(-math.inf if v is None or math.isnan(v) else v
                     for v in (s["lpr"][b], s["first_token_mass"][b]))

    matched = abs(kl["lens"] - kl["steer"]) <= KL_MATCH
    sl, ss = score("lens"), score("steer")
    if matched:
        better = "lens" if sl > ss else "steer" if ss > sl else "tie"
    else:
        low, high = sorted(kl, key=kl.get)
        both = zip(score(low), score(high), strict=True)
        better = low if all(a >= b for a, b in both) else None
    return {"kl_tolerance": KL_MATCH, "english_kl": kl, "matched": matched, "better": better,
            "lpr": {b: s["lpr"][b] for b in kl},
            "first_token_mass": {b: s["first_token_mass"][b] for b in kl}}
