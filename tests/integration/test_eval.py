"""Eval: the shared-prefix measuring pass gives the report of the whole-model oracle.

``tests/oracles/naive_eval.py`` measures the first way (the full model, the delta applied in
place, the steered branch as a forward pre-hook on block N-K, ``generate`` keeping every
state, fixed batches in prompt order); the eval shares the blocks below the delta's, sorts
prompts by length and sizes batches from a memory budget. Same greedy replies, same LPR and
fidelity, every metric within 1e-4 (states and first-token mass within 1e-5).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from lens_merge.data import load_prompts
from tests.oracles.naive_eval import naive_evaluate

LANGS = ["en", "zh", "de", "ar"]
TOL = 1e-4


@pytest.fixture(scope="module")
def case(tiny_model, tmp_path_factory):
    """Factory: family -> (model dir, delta, subspace, held-out prompts)."""
    from lens_merge.lens.probe import probe
    from lens_merge.models import load_model, load_tokenizer
    from lens_merge.testing import random_delta

    made = {}

    def make(family: str):
        if family not in made:
            d = tiny_model(family.removesuffix("-hybrid"))
            if family.endswith("-hybrid"):  # as Gemma 2 checkpoints ship: generate's own cache
                d = Path(shutil.copytree(d, tmp_path_factory.mktemp(family) / "m"))
                cfg = json.loads((d / "generation_config.json").read_text())
                cfg["cache_implementation"] = "hybrid"
                (d / "generation_config.json").write_text(json.dumps(cfg))
            texts = load_prompts("default", LANGS, split="train", max_samples=8)
            sub = probe(load_model(d), load_tokenizer(d),
                        {lang: texts.texts(lang) for lang in LANGS}, batch_size=8)
            held = load_prompts("default", LANGS, split="heldout", max_samples=7)
            made[family] = (d, random_delta(d, top_k=2, scale=0.05, languages=LANGS), sub, held,
                            load_prompts("default", LANGS, split="train", max_samples=48))
        return made[family]

    return make


def _compare(got, want, path="report") -> list[str]:
    """Paths where two reports differ: floats by more than TOL, anything else at all."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), path
        return [p for k in want for p in _compare(got[k], want[k], f"{path}.{k}")]
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        return [p for i, (g, w) in enumerate(zip(got, want, strict=True))
                for p in _compare(g, w, f"{path}[{i}]")]
    if isinstance(want, float) and not isinstance(want, bool):
        if math.isnan(want):
            return [] if math.isnan(got) else [path]
        return [] if abs(got - want) <= TOL else [f"{path}: {got} vs {want}"]
    return [] if got == want else [f"{path}: {got!r} vs {want!r}"]


def _token_ids(d, train):
    from lens_merge.lens.fidelity import indicative_tokens
    from lens_merge.models import load_tokenizer

    return indicative_tokens(load_tokenizer(d), {lang: train.texts(lang) for lang in LANGS})


@pytest.mark.parametrize("family", ["llama3", "gemma2", "gemma2-hybrid", "phi3"])
def test_eval_equals_whole_model_oracle(case, family):
    import torch

    from lens_merge.lens.evaluate import evaluate

    d, delta, sub, held, train = case(family)
    want = naive_evaluate(d, delta, sub, held, max_length=64, batch_size=5, max_new_tokens=8,
                          token_ids=_token_ids(d, train))
    # a budget of a few rows: several batch sizes, each batch of one length class
    got = evaluate(d, delta, sub, held, max_length=64, batch_size=48, max_new_tokens=8,
                   max_memory="3MB", train_prompts=train)
    assert _compare(got.report, want.report) == []
    for lang in LANGS:  # replies are compared through samples; fidelity through its share
        assert got.report["samples"][lang] == want.report["samples"][lang]
    for label in ("base", "lens"):
        torch.testing.assert_close(got.mean_states[label], want.mean_states[label],
                                   atol=1e-5, rtol=1e-5)
    # the delta does something the eval can see; the first-token mass is measured
    s, per = want.report["summary"], want.report["per_language"]
    assert s["english_kl"] > 1e-4
    assert s["own_direction"]["base"] != s["own_direction"]["lens"]
    assert got.report["format_version"] == 2 and "steer" not in got.report["branches"]
    assert all(0 < per[lang]["first_token_mass_base"] < 1 for lang in LANGS)
    assert "lpr_steer" not in per["zh"] and "steering" not in s


def _steer_vectors(sub, alpha: float):
    """zh and ar steered (de not), delta_l at the input of block 2 (hidden_states[2])."""
    return {lang: alpha * sub.layers[1].deltas[sub.languages.index(lang)] for lang in ("zh", "ar")}


def test_eval_replies_equal_oracle_row_by_row(case):
    """Every reply and its ids, the English logits, the states and the first-token mass, for
    base, Lens and steering."""
    import torch

    from lens_merge.architectures import for_config
    from lens_merge.lens._generate import LensBlocks, measure
    from lens_merge.models import load_model, load_tokenizer
    from lens_merge.weights.delta import apply_delta
    from tests.oracles.naive_eval import naive_measure

    d, delta, sub, held, train = case("llama3")
    tok, model = load_tokenizer(d), load_model(d)
    ids = _token_ids(d, train)
    vecs = _steer_vectors(sub, 4.0)
    blocks = LensBlocks(model, for_config(model.config.to_dict()), delta)
    got, n_batches = measure(model, tok, blocks, held, 64, 6, 8, True, 1 << 40, token_ids=ids,
                             steer=vecs)
    assert n_batches == math.ceil(len(LANGS) * len(held) / 6)
    want = {"base": naive_measure(model, tok, held, 64, 5, 8, True, ids),
            "steer": naive_measure(model, tok, held, 64, 5, 8, True, ids, steer=vecs, layer=2)}
    apply_delta(model, delta)
    want["lens"] = naive_measure(model, tok, held, 64, 5, 8, True, ids)
    assert set(got) == set(want)
    for label in want:
        g, w = got[label], want[label]
        assert g.replies == w.replies and g.reply_ids == w.reply_ids, label
        torch.testing.assert_close(g.logits, w.logits, atol=1e-4, rtol=1e-5)
        for lang in LANGS:
            torch.testing.assert_close(g.states[lang], w.states[lang], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(g.mass[lang], w.mass[lang], atol=1e-5, rtol=0)
    base, lens, steer = got["base"], got["lens"], got["steer"]
    assert base.replies != lens.replies  # the branches really differ
    for lang in ("zh", "ar"):  # steered languages move, the others are the base's exactly
        assert not torch.equal(steer.states[lang], base.states[lang])
    for lang in ("en", "de"):
        assert torch.equal(steer.states[lang], base.states[lang])
        assert steer.reply_ids[lang] == base.reply_ids[lang]
    assert torch.equal(steer.logits, base.logits)


def test_steering_with_alpha_zero_is_the_base_exactly(case):
    import torch

    from lens_merge.architectures import for_config
    from lens_merge.lens._generate import LensBlocks, measure
    from lens_merge.models import load_model, load_tokenizer

    d, delta, sub, held, train = case("llama3")
    tok, model = load_tokenizer(d), load_model(d)
    blocks = LensBlocks(model, for_config(model.config.to_dict()), delta)
    got, _ = measure(model, tok, blocks, held, 64, 48, 8, True, 1 << 40,
                     token_ids=_token_ids(d, train), steer=_steer_vectors(sub, 0.0))
    base, steer = got["base"], got["steer"]
    assert steer.replies == base.replies and steer.reply_ids == base.reply_ids
    assert torch.equal(steer.logits, base.logits)
    for lang in LANGS:
        assert torch.equal(steer.states[lang], base.states[lang])
        assert torch.equal(steer.mass[lang], base.mass[lang])


def test_eval_with_steering_chooses_alpha_on_training_rows_and_matches_oracle(case):
    """Steering on: report v2 keys for the three branches, alphas by the documented rule, and
    the whole report equal to the oracle's run with the same alphas."""
    from lens_merge.lens.evaluate import evaluate
    from lens_merge.lens.steer import MIN_DISTINCT

    d, delta, sub, held, train = case("llama3")
    got = evaluate(d, delta, sub, held, max_length=64, max_new_tokens=8, train_prompts=train,
                   steering=True, steering_alphas=[1.0, 4.0, 64.0], steering_rows=4,
                   steering_tokens=6)
    rep = got.report
    s, per = rep["summary"], rep["per_language"]
    assert rep["format_version"] == 2 and rep["branches"] == ["base", "steer", "lens"]
    for lang in LANGS:
        for b in ("base", "steer", "lens"):
            for k in ("lpr", "lpr_ci", "echo", "first_token_mass", "fidelity", "fidelity_ci"):
                assert f"{k}_{b}" in per[lang], (lang, k, b)
            lo, hi = per[lang][f"lpr_ci_{b}"]
            assert lo <= per[lang][f"lpr_{b}"] <= hi
    for k in ("lpr", "first_token_mass", "echo", "fidelity", "english_fidelity"):
        assert set(s[k]) == {"base", "steer", "lens"}, k
    for k in ("english_kl", "english_top1_agreement", "english_identical_replies",
              "english_kl_steer", "english_identical_replies_ci", "steering_vs_lens"):
        assert k in s, k
    assert s["english_kl_steer"] == 0.0 and s["english_identical_replies_steer"] == 1.0
    st = s["steering"]
    assert st["layer"] == 2 and st["probe_layer"] == "hidden_states[2]"
    assert set(st["alpha"]) == set(LANGS[1:]) and "English" in st["note"]
    checked = 0
    for lang, rows in st["grid"].items():
        assert [r["alpha"] for r in rows] == [1.0, 4.0, 64.0]
        base = st["base_on_rows"][lang]
        peak = max(range(3), key=lambda j: rows[j]["first_token_mass"])
        cands = [r for r in rows[:peak + 1] if r["first_token_mass"] > base["first_token_mass"]]
        for r in rows:  # only candidates get replies; each verdict follows the definition
            if r["degenerate"] is None:
                continue
            checked += 1
            assert r in cands
            assert r["degenerate"] == (r["distinct"] < MIN_DISTINCT or r["lpr"] < base["lpr"])
        ok = [r["alpha"] for r in rows if r["degenerate"] is False]
        assert st["alpha"][lang] == max(ok, default=0.0)
        assert all(r["degenerate"] for r in rows if r["degenerate"] is not None
                   and r["alpha"] > st["alpha"][lang])
        assert (st["alpha"][lang] == 0.0) == (not ok)
    assert checked >= 1 and 1 <= st["rounds"] <= 2  # bisection of at most 3 candidates
    # the oracle with the chosen alphas: every number of the report
    want = naive_evaluate(d, delta, sub, held, max_length=64, batch_size=5, max_new_tokens=8,
                          token_ids=_token_ids(d, train), alphas=st["alpha"], steering=st)
    assert _compare(rep, want.report) == []


def test_eval_without_generation_equals_oracle(case):
    from lens_merge.lens.evaluate import evaluate

    d, delta, sub, held, train = case("qwen3")
    want = naive_evaluate(d, delta, sub, held, max_length=64, batch_size=4, max_new_tokens=0,
                          token_ids=_token_ids(d, train))
    got = evaluate(d, delta, sub, held, max_length=64, max_new_tokens=0, train_prompts=train)
    assert _compare(got.report, want.report) == []
    assert got.report["samples"] == {}


def test_more_english_prompts_count_in_the_english_checks(case):
    """english_extra: English-only rows join the English KL, top-1 and identical replies, with
    the numbers an eval over all the rows gives; the target languages keep their rows."""
    from lens_merge.data import PromptSet
    from lens_merge.errors import ConfigError
    from lens_merge.lens.evaluate import evaluate

    d, delta, sub, held, _ = case("llama3")
    few = PromptSet(held.languages, held.rows[:3], held.source)
    more = PromptSet(("en",), tuple({"en": r["en"]} for r in held.rows[3:]), held.source)
    kw = dict(max_length=64, batch_size=48, max_new_tokens=8)
    whole = evaluate(d, delta, sub, held, **kw).report["summary"]
    got = evaluate(d, delta, sub, few, english_extra=more, **kw).report
    s = got["summary"]
    assert s["english_prompts"] == len(held) == 7 and whole["english_prompts"] == 7
    for k in ("english_kl", "english_kl_max", "english_top1_agreement",
              "english_identical_replies"):
        assert abs(s[k] - whole[k]) <= TOL, (k, s[k], whole[k])
    assert got["n_prompts"] == 3  # LPR and the rest: the eval rows only
    assert got["per_language"]["zh"] == evaluate(d, delta, sub, few, **kw).report[
        "per_language"]["zh"]
    with pytest.raises(ConfigError, match="English prompts only"):
        evaluate(d, delta, sub, few, english_extra=few, **kw)


def test_steering_versus_lens_at_matched_english_kl():
    from lens_merge.lens.steer import versus

    def summ(kl_lens, lpr_s, lpr_l, m_s=0.5, m_l=0.5):
        return {"english_kl": kl_lens, "english_kl_steer": 0.0, "lpr": {"steer": lpr_s,
                "lens": lpr_l}, "first_token_mass": {"steer": m_s, "lens": m_l}}

    assert versus(summ(0.005, 0.5, 0.6))["better"] == "lens"  # matched: higher LPR wins
    assert versus(summ(0.005, 0.6, 0.6, 0.4, 0.5))["better"] == "lens"  # then the mass
    assert versus(summ(0.01, 0.6, 0.6))["better"] == "tie"
    v = versus(summ(0.04, 0.88, 0.52))  # unmatched: the lower KL wins only if not worse
    assert not v["matched"] and v["better"] == "steer"
    assert versus(summ(0.04, 0.5, 0.6))["better"] is None
    assert versus(summ(0.04, 0.7, 0.6, 0.4, 0.5))["better"] is None


def test_steering_directions_and_distinct_ratio():
    import torch

    from lens_merge.lens.probe import LayerSubspace, Subspace
    from lens_merge.lens.steer import directions, distinct_ratio

    layers = [LayerSubspace(torch.zeros(3), torch.zeros(3, 1), torch.zeros(2, 3),
                            torch.tensor([[0.0, 0, 0], [k, 1, 2]])) for k in (10.0, 20.0, 30.0)]
    sub = Subspace(["en", "zh"], layers)
    v, info = directions(sub, ["zh"], 2)  # block 2's input = hidden_states[2] = layers[1]
    assert v["zh"].tolist() == [20.0, 1, 2] and info == {"layer": 2,
                                                         "probe_layer": "hidden_states[2]"}
    v, info = directions(sub, ["zh"], 0)  # embeddings are not probed: nearest, with a note
    assert v["zh"].tolist() == [10.0, 1, 2] and "hidden_states[1]" in info["probe_layer_note"]
    assert distinct_ratio((5, 5, 5, 5)) == 0.25 and distinct_ratio((1, 2)) == 1.0
    assert distinct_ratio(()) == 0.0


def test_plan_batches_sorted_within_budget_and_cap():
    from lens_merge.lens._generate import plan_batches

    lengths = [9, 3, 7, 3, 12, 1, 7, 7, 30]
    cost = lambda n: 10 * n  # noqa: E731
    plan = plan_batches(lengths, cost, budget=200, cap=3)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in plan for i in b]
    assert flat == sorted(lengths)
    for b in plan:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * cost(max(lengths[i] for i in b)) <= 200
    assert plan[-1] == [8]  # 30 tokens: over the budget with any company, alone
    assert plan[0] == [5, 1, 3]  # ties keep prompt order


def test_row_bytes_grows_with_length_and_counts_both_caches(tiny_model):
    from transformers import AutoConfig

    from lens_merge.lens._generate import row_bytes

    cfg = AutoConfig.from_pretrained(tiny_model("llama3"))
    a, b = row_bytes(cfg, 4, 10, 8), row_bytes(cfg, 4, 20, 8)
    kv_per_token = cfg.num_hidden_layers * cfg.num_key_value_heads * 16 * 2 * 4
    assert b - a >= 2 * kv_per_token * 10  # base and Lens caches
    assert a >= 2 * kv_per_token * 18 + cfg.vocab_size * 4


def test_max_memory_takes_bytes_or_sizes():
    from pydantic import ValidationError

    from lens_merge.config import EvalConfig
    from lens_merge.plan.machine import parse_size

    for given, n in (("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), (1000, 1000)):
        assert parse_size(EvalConfig(max_memory=given).max_memory) == n
    assert EvalConfig().max_memory is None
    for bad in ("2XB", "-1GB", 0, True, 1.5):
        with pytest.raises(ValidationError, match="max_memory"):
            EvalConfig(max_memory=bad)


def test_eval_refuses_a_bad_budget_before_loading(case):
    from lens_merge.errors import ConfigError
    from lens_merge.lens.evaluate import evaluate

    d, delta, sub, held, _ = case("llama3")
    with pytest.raises(ConfigError, match="eval.max_memory"):
        evaluate(d / "missing", delta, sub, held, max_memory="lots")


def test_delta_outside_the_blocks_is_refused(case):
    import torch

    from lens_merge.architectures import for_config
    from lens_merge.errors import DeltaError
    from lens_merge.lens._generate import LensBlocks
    from lens_merge.models import load_model
    from lens_merge.weights.delta import LensDelta

    d = case("llama3")[0]
    model = load_model(d)
    arch = for_config(model.config.to_dict())
    bad = LensDelta({"model.norm.weight": torch.zeros(model.config.hidden_size)})
    with pytest.raises(DeltaError, match="model.norm.weight"):
        LensBlocks(model, arch, bad)
    wrong = LensDelta({"model.layers.3.mlp.up_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(DeltaError, match="shape"):
        LensBlocks(model, arch, wrong)


def test_lens_blocks_equal_apply_delta_in_bf16(tiny_model):
    """The Lens copies hold what ``apply_delta`` writes (fp32 sum, cast back), bit for bit."""
    import torch

    from lens_merge.architectures import for_config
    from lens_merge.lens._generate import LensBlocks, default_budget
    from lens_merge.models import load_model
    from lens_merge.testing import random_delta
    from lens_merge.weights.delta import apply_delta

    d = tiny_model("llama3", dtype="bf16")
    delta = random_delta(d, top_k=2, scale=0.05)
    model = load_model(d, dtype=None)
    blocks = LensBlocks(model, for_config(model.config.to_dict()), delta)
    assert blocks.first == 2 and sorted(blocks.lens) == [2, 3]
    base_before = {n: p.clone() for n, p in model.named_parameters()}
    with blocks.swapped():
        swapped = {n: p.clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():  # the base blocks are back, unchanged
        assert p.dtype == torch.bfloat16 and torch.equal(p, base_before[n]), n
    apply_delta(model, delta)
    changed = 0
    for n, p in model.named_parameters():
        assert torch.equal(swapped[n], p), n
        changed += not torch.equal(p, base_before[n])
    assert changed == len(delta.tensors)
    budget = default_budget(model.device)
    assert budget > 0 and budget & (budget - 1) == 0
