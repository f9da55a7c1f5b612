"""Eval: the shared-prefix measuring pass gives the report of the whole-model oracle.

``tests/oracles/naive_eval.py`` measures the first way (the full model, the delta applied in
place, ``generate`` keeping every state, fixed batches in prompt order); the eval shares the
blocks below the delta's, sorts prompts by length and sizes batches from a memory budget.
Same greedy replies, same fidelity, every metric within 1e-4.
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
            made[family] = (d, random_delta(d, top_k=2, scale=0.05, languages=LANGS), sub, held)
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


@pytest.mark.parametrize("family", ["llama3", "gemma2", "gemma2-hybrid", "phi3"])
def test_eval_equals_whole_model_oracle(case, family):
    import torch

    from lens_merge.lens.evaluate import evaluate

    d, delta, sub, held = case(family)
    want = naive_evaluate(d, delta, sub, held, max_length=64, batch_size=5, max_new_tokens=8)
    # a budget of a few rows: several batch sizes, each batch of one length class
    got = evaluate(d, delta, sub, held, max_length=64, batch_size=48, max_new_tokens=8,
                   max_memory="3MB")
    assert _compare(got.report, want.report) == []
    for lang in LANGS:  # replies are compared through samples; fidelity through its share
        assert got.report["samples"][lang] == want.report["samples"][lang]
    for label in ("base", "lens"):
        torch.testing.assert_close(got.mean_states[label], want.mean_states[label],
                                   atol=1e-5, rtol=1e-5)
    # the delta does something the eval can see
    s = want.report["summary"]
    assert s["english_kl"] > 1e-4
    assert s["own_direction"]["base"] != s["own_direction"]["lens"]


def test_eval_replies_equal_oracle_row_by_row(case):
    """Every reply (not only the report's samples), the English logits and the states."""
    import torch

    from lens_merge.architectures import for_config
    from lens_merge.lens._generate import LensBlocks, measure
    from lens_merge.models import load_model, load_tokenizer
    from lens_merge.weights.delta import apply_delta
    from tests.oracles.naive_eval import naive_measure

    d, delta, _, held = case("llama3")
    tok, model = load_tokenizer(d), load_model(d)
    blocks = LensBlocks(model, for_config(model.config.to_dict()), delta)
    base, lens, n_batches = measure(model, tok, blocks, held, 64, 6, 8, True, 1 << 40)
    assert n_batches == math.ceil(len(LANGS) * len(held) / 6)
    want_base = naive_measure(model, tok, held, 64, 5, 8, True)
    apply_delta(model, delta)
    want_lens = naive_measure(model, tok, held, 64, 5, 8, True)
    for got, want in ((base, want_base), (lens, want_lens)):
        assert got.replies == want.replies
        torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-5)
        for lang in LANGS:
            torch.testing.assert_close(got.states[lang], want.states[lang], atol=1e-5, rtol=1e-5)
    assert base.replies != lens.replies  # the branches really differ


def test_eval_without_generation_equals_oracle(case):
    from lens_merge.lens.evaluate import evaluate

    d, delta, sub, held = case("qwen3")
    want = naive_evaluate(d, delta, sub, held, max_length=64, batch_size=4, max_new_tokens=0)
    got = evaluate(d, delta, sub, held, max_length=64, max_new_tokens=0)
    assert _compare(got.report, want.report) == []
    assert got.report["samples"] == {}


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

    d, delta, sub, held = case("llama3")
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
