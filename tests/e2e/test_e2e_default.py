"""The real default model end to end: probe -> a few training steps -> delta -> eval."""

from __future__ import annotations

import pytest
import torch

from lens_merge.config import TrainConfig
from lens_merge.data import load_prompts
from lens_merge.lens.evaluate import evaluate, write_report
from lens_merge.lens.probe import probe
from lens_merge.lens.train import train
from lens_merge.models import load_model, load_tokenizer
from lens_merge.weights.delta import LensDelta

pytestmark = pytest.mark.slow
LANGS = ["en", "zh", "sw"]


def test_default_model_probe_train_delta_eval(default_model_dir, tmp_path):
    tok = load_tokenizer(default_model_dir)
    model = load_model(default_model_dir)
    texts = load_prompts("default", LANGS, split="train", max_samples=16)
    sub = probe(model, tok, {lang: texts.texts(lang) for lang in LANGS}, max_length=96)
    del model
    ly = sub.layer(-1)
    assert sub.meta["num_layers"] == 30 and ly.M_s.shape == (576, 2)
    assert float((ly.M_s.T @ ly.u).abs().max()) < 1e-8
    sub.save(tmp_path / "subspace")

    cfg = TrainConfig(top_k=2, lr=2e-4, epochs=1, batch_size=4, grad_accum=1, warmup_ratio=0.0)
    res = train(default_model_dir, sub, texts, cfg, tmp_path / "work", max_length=96,
                base_ref="default")
    assert res.steps == 4
    delta = res.delta
    assert {delta.meta["blocks"][0], delta.meta["blocks"][-1]} == {28, 29}
    assert all(n.startswith(("model.layers.28.", "model.layers.29.")) for n in delta.names)
    assert len(delta.names) == 18
    delta.save(tmp_path / "delta")
    delta = LensDelta.load(tmp_path / "delta")

    held = load_prompts("default", LANGS, split="heldout", max_samples=8)
    result = evaluate(default_model_dir, delta, sub, held, max_length=96, max_new_tokens=12)
    rep = result.report
    s = rep["summary"]
    # training pushed targets along their own direction, and English barely moved
    assert s["own_direction"]["lens"] > s["own_direction"]["base"]
    assert 0 <= s["english_kl"] < 0.5
    assert s["english_top1_agreement"] >= 0.75
    assert set(rep["per_language"]) == set(LANGS)
    assert 0.0 <= s["fidelity"]["base"] <= 1.0
    assert result.mean_states["base"].shape == (3, 576)
    assert not torch.equal(result.mean_states["base"], result.mean_states["lens"])
    p = write_report(result, tmp_path / "report")
    assert p.is_file() and (tmp_path / "report" / "mean_states.safetensors").is_file()
