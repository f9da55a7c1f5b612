"""The real default model (SmolLM2-135M): fold, reload, generate, verify (slow)."""

from __future__ import annotations

import pytest

from lens_merge.models import load_model, load_tokenizer
from lens_merge.testing import random_delta
from lens_merge.weights.delta import apply_delta
from lens_merge.weights.fold import (
    fold,
    verify_fold,
)
from tests.integration.test_fold import LANGS, _tensor_hashes


@pytest.mark.slow
def test_default_model_fold_reload_generate(default_model_dir, tmp_path):
    import torch

    delta = random_delta(default_model_dir, top_k=2, scale=0.002, languages=LANGS)
    rep = fold("default", delta, tmp_path / "out")
    assert rep.max_cast_error == 0.0 and rep.changed_tensors == len(delta.names)
    base_h, out_h = _tensor_hashes(default_model_dir), _tensor_hashes(rep.out)
    assert {n for n in base_h if base_h[n] != out_h[n]} == set(delta.names)
    tok = load_tokenizer(rep.out)
    ref = load_model(default_model_dir, "fp32")
    apply_delta(ref, delta)
    new = load_model(rep.out, "fp32")
    from lens_merge.lens.hidden import encode

    enc = encode(tok, ["What is the capital of France?"], max_length=64)
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        a = ref.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
        b = new.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
    assert a.tolist() == b.tolist() and b.shape[1] > enc["input_ids"].shape[1]
    v = verify_fold("default", delta, rep.out, languages=LANGS)
    assert v.passed and v.metrics["max_abs_logit_diff"] <= 1e-5 and v.variant == "float32"
