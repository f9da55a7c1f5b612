"""Verifiers hold one torch model at a time: the reference's logits are kept, the model freed
before the next one loads (the peak memory of ``verify`` and ``adapters`` is one model)."""

from __future__ import annotations

import gc
import weakref

import pytest

import lens_merge.models as models
from lens_merge.testing import random_delta
from lens_merge.weights.fold import fold, verify_fold
from tests.conftest import requires_peft

LANGS = ["en", "zh"]


@pytest.fixture
def one_at_a_time(monkeypatch):
    """Wrap ``load_model``: each call first checks that no model it returned is alive."""
    real, alive, loads = models.load_model, [], []

    def load(*args, **kwargs):
        gc.collect()
        held = [r() for r in alive if r() is not None]
        assert not held, f"load #{len(loads) + 1} while {len(held)} model(s) still held"
        model = real(*args, **kwargs)
        alive.append(weakref.ref(model))
        loads.append(args[0])
        return model

    monkeypatch.setattr(models, "load_model", load)
    return loads


def test_verify_fold_loads_one_model_at_a_time(tiny_model, tmp_path, one_at_a_time):
    base = tiny_model("llama")
    delta = random_delta(base, top_k=2, scale=0.02, languages=LANGS)
    folded = fold(base, delta, tmp_path / "folded").out
    rep = verify_fold(base, delta, folded)
    assert len(one_at_a_time) == 2  # base (+ delta), then the folded checkpoint
    assert rep.passed and rep.metrics["max_abs_logit_diff"] <= 1e-5
    assert rep.metrics["top1_agreement"] == 1.0 and rep.n_prompts == 2 * len(LANGS)
    # a wrong fold still fails: the kept reference logits are the base + delta's
    other = fold(base, random_delta(base, top_k=2, scale=0.05, seed=3), tmp_path / "wrong").out
    bad = verify_fold(base, delta, other, raise_on_failure=False)
    assert not bad.passed and bad.metrics["max_abs_logit_diff"] > 1e-3


def test_verify_fold_matches_two_models_side_by_side(tiny_model, tmp_path):
    """The numbers equal those of both models run batch by batch, side by side."""
    import torch

    from lens_merge.lens.hidden import batches, encode
    from lens_merge.parity.metrics import max_abs_diff
    from lens_merge.parity.prompts import parity_prompts
    from lens_merge.weights.delta import apply_delta

    base = tiny_model("llama")
    delta = random_delta(base, top_k=2, scale=0.05, seed=5, languages=LANGS)
    other = fold(base, random_delta(base, top_k=2, scale=0.05, seed=3), tmp_path / "wrong").out
    rep = verify_fold(base, delta, other, raise_on_failure=False)
    items = parity_prompts(LANGS, per_language=2, by_row=False)
    ref = models.load_model(base, dtype=None)
    apply_delta(ref, delta)
    new, tok = models.load_model(other, dtype=None), models.load_tokenizer(other)
    diffs = []
    with torch.no_grad():
        for chunk in batches(items, 8):
            enc = encode(tok, [t for _, t in chunk], 64)
            a, b = ref(**enc).logits.float(), new(**enc).logits.float()
            m = enc["attention_mask"].bool()
            diffs += [max_abs_diff(a[i][m[i]], b[i][m[i]]) for i in range(len(chunk))]
    assert [r["max_abs_logit_diff"] for r in rep.details["prompts"]] == diffs
    assert rep.metrics["max_abs_logit_diff"] == max(diffs) > 1e-3


@requires_peft
def test_verify_peft_lora_loads_one_model_at_a_time(tiny_model, tmp_path, one_at_a_time):
    from lens_merge.adapters.peft_lora import export_peft_lora, verify_peft_lora

    base = tiny_model("llama")
    delta = random_delta(base, top_k=2, scale=0.01, languages=LANGS).save(tmp_path / "delta")
    export_peft_lora(delta, tmp_path / "a", base=base)
    v = verify_peft_lora(base, tmp_path / "a", write_report=False)
    assert len(one_at_a_time) == 3  # base + delta, base + the adapter's files, PEFT's base
    assert v.passed and v.variant == "full_rank" and v["max_abs_logit_diff"] <= 1e-4
    assert v["adapter_max_abs_logit_diff"] <= 1e-4 and v["top1_agreement"] == 1.0
