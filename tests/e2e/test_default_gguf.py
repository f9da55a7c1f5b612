"""The real default model (SmolLM2-135M) folded after a delta: GGUF checks (slow)."""

from __future__ import annotations

import pytest

from tests.conftest import requires_llama
from tests.integration.test_gguf import SMOLLM_HASH, _limits, _read


def test_default_tokenizer_hashes_to_smollm(default_tokenizer_dir):
    from transformers import AutoTokenizer

    from lens_merge.export.gguf._vocab import detect_pretokenizer, pretokenizer_hash

    tok = AutoTokenizer.from_pretrained(str(default_tokenizer_dir))
    assert pretokenizer_hash(tok) == SMOLLM_HASH
    assert detect_pretokenizer(tok, default_tokenizer_dir) == ("smollm", SMOLLM_HASH)


@pytest.fixture(scope="module")
def folded_default(default_model_dir, tmp_path_factory):
    from lens_merge.testing import random_delta
    from lens_merge.weights.fold import fold

    out = tmp_path_factory.mktemp("default-folded") / "model"
    fold(default_model_dir, random_delta(default_model_dir, top_k=2, scale=0.002), out)
    return out


@pytest.mark.slow
@requires_llama
def test_default_model_f32_f16_q8_in_llama_cpp(folded_default, tmp_path):
    from lens_merge.config import DEFAULT_LANGUAGES
    from lens_merge.export.gguf import export_gguf, verify_gguf

    sizes = {}
    for outtype in ("f32", "f16", "q8_0"):
        out = tmp_path / f"m-{outtype}.gguf"
        rep = export_gguf(folded_default, out, outtype=outtype)
        sizes[outtype] = rep["bytes"]
        assert rep["tokenizer"]["pre"] == "smollm"
        f, t = _read(out)
        assert f["general.base_model.0.name"] == "SmolLM2-135M-Instruct"
        assert f["general.base_model.0.organization"] == "HuggingFaceTB"
        assert f["general.license"] == "apache-2.0" and f["general.size_label"] == "135M"
        assert "output.weight" not in t and "token_embd.weight" in t  # tied embeddings
        langs = list(DEFAULT_LANGUAGES) if outtype == "f16" else ["en", "zh", "ar"]
        v = verify_gguf(folded_default, out, languages=langs,
                        max_new_tokens=32 if outtype == "f16" else 12)
        assert v.passed, v.failures
        assert v.details["chat_template_match"] is True
        assert v.metrics["tokenization_match"] == 1.0
        if outtype == "f32":
            assert v.metrics["top1_agreement"] == 1.0 and v.metrics["max_abs_logit_diff"] < 0.1
        if outtype == "f16":
            assert v.metrics["generation_match"] == 1.0, v.details["prompts"]
            assert len(v.languages) == 10 and set(v.per_language) == set(langs)
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


@pytest.mark.slow
@requires_llama
def test_default_model_kquant_smaller_than_q8(folded_default, tmp_path):
    from lens_merge.export.gguf import export_gguf, verify_gguf

    q8 = export_gguf(folded_default, tmp_path / "q8.gguf", outtype="q8_0")
    k = export_gguf(folded_default, tmp_path / "k.gguf", outtype="q4_k_m")
    assert k["bytes"] < q8["bytes"]
    v = verify_gguf(folded_default, tmp_path / "k.gguf", languages=["en", "es"],
                    max_new_tokens=8)
    assert v.passed, v.failures
    assert "first_token_agreement" in _limits(v)
