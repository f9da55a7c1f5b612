"""The real default model (SmolLM2-135M) folded after a delta: ONNX checks (slow)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_default_model_exports_verifies_and_generates_the_same(default_model_dir, tmp_path):
    """The default model with a delta folded into its top blocks, as a Lens release has it."""
    from lens_merge.config import DEFAULT_LANGUAGES
    from lens_merge.export.onnx import export_onnx, onnx_verification_status, verify_onnx
    from lens_merge.testing import random_delta
    from lens_merge.weights.fold import fold

    folded = fold(default_model_dir, random_delta(default_model_dir, top_k=2, scale=0.002),
                  tmp_path / "folded").out
    out = tmp_path / "onnx"
    rec = export_onnx(folded, out, quantize="int8")
    # every default language (the folded model's provenance names the delta's three)
    result = verify_onnx(folded, out, languages=list(DEFAULT_LANGUAGES))
    assert result.passed, result.failures
    rep, q = result.reports
    # tolerance: atol 1e-4 + rtol 1e-5 * |logit| (measured 1.3e-4 against a bound of 3.8e-4)
    assert rep.n_prompts == 10 and rep["max_abs_logit_diff"] <= rep["tolerance"] < 5e-4
    assert rep["generations_equal"] == 10  # ORT with KV cache == transformers, 32 tokens
    assert rec["quantized"]["bytes"] < 0.5 * rec["graph_bytes"]
    # measured: top-1 0.947, KL 0.0042 (weight-only); quantize_dynamic gave top-1 0.47, KL 1.0
    assert q["top1_agreement"] > 0.9 and q["kl_mean"] < 0.05
    assert q["top1_agreement_all_positions"] > 0.9
    assert (out / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (out / "tokenizer_config.json").read_text())
    assert onnx_verification_status(out) == "passed"
