"""Eval internals: generation's prefill gives the same states and logits as a plain forward."""

from __future__ import annotations

import pytest

from lens_merge.data import PromptSet


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_prefill_equals_forward(tiny_model, family):
    import torch

    from lens_merge.lens.evaluate import _measure
    from lens_merge.models import load_model, load_tokenizer

    d = tiny_model(family)
    model, tok = load_model(d), load_tokenizer(d)
    rows = [{"en": "Name three fruits.", "de": "Nenne drei Früchte."},
            {"en": "Write a short poem about the sea at night.", "de": "Schreib ein Gedicht."},
            {"en": "Hi", "de": "Hallo"}]
    prompts = PromptSet(("en", "de"), tuple(rows), "inline")
    torch.manual_seed(0)
    s_gen, l_gen, r_gen = _measure(model, tok, prompts, 64, 2, 4, True, _null(), "x")
    s_fwd, l_fwd, r_fwd = _measure(model, tok, prompts, 64, 2, 0, True, _null(), "x")
    for lang in ("en", "de"):
        assert s_gen[lang].shape == (3, model.config.hidden_size)
        torch.testing.assert_close(s_gen[lang], s_fwd[lang], atol=1e-5, rtol=1e-5)
        assert len(r_gen[lang]) == 3 and r_fwd[lang] == []
    assert l_gen.shape == (3, model.config.vocab_size)
    torch.testing.assert_close(l_gen, l_fwd, atol=1e-4, rtol=1e-5)


def _null():
    from lens_merge.progress import NULL

    return NULL
