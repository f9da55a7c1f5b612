"""The embedded default model: a faithful plain HF checkpoint of SmolLM2-135M-Instruct."""

from __future__ import annotations

import json

import pytest

from lens_merge.config import DEFAULT_LANGUAGES
from lens_merge.data import load_prompts
from tests.conftest import requires_llama

pytestmark = pytest.mark.slow


def test_layout(default_model_dir):
    names = {p.name for p in default_model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= names
    assert "tokenizer.model" not in names
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"]) == ("llama", 30, 576)
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)


def test_tokenizer_contract(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    assert type(tok).__name__ == "GPT2TokenizerFast"
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 2)
    assert (tok.unk_token, tok.unk_token_id) == ("<|endoftext|>", 0)
    assert tok("Hello").input_ids == tok("Hello", add_special_tokens=False).input_ids
    tj = json.loads((default_model_dir / "tokenizer.json").read_text())
    assert tj["model"]["type"] == "BPE" and tj["decoder"]["type"] == "ByteLevel"
    assert tj["post_processor"] is None
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text.count("<|im_start|>") == 3 and text.endswith("<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[0] == 1 and ids[1] != 1  # exactly one <|im_start|>, not doubled
    assert tok.decode(tok("  ünïcødé 123 你好").input_ids) == "  ünïcødé 123 你好"


@requires_llama
def test_tokenization_equals_llama_cpp_on_every_default_language(default_model_dir):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from lens_merge.default_model import default_gguf_path

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    llm = Llama(str(default_gguf_path()), vocab_only=True, verbose=False)
    rows = load_prompts("default", DEFAULT_LANGUAGES, split="all", max_samples=12)
    checked = 0
    for lang in DEFAULT_LANGUAGES:
        for text in rows.texts(lang) + [f"  {lang}: 3.14159 — x²\n\ttab"]:
            templated = tok.apply_chat_template([{"role": "user", "content": text}],
                                                add_generation_prompt=True, tokenize=False)
            for s in (text, templated):
                ours = tok(s, add_special_tokens=False).input_ids
                theirs = llm.tokenize(s.encode(), add_bos=False, special=True)
                assert ours == theirs, (lang, s)
                checked += 1
    assert checked == 2 * len(DEFAULT_LANGUAGES) * 13


def test_greedy_answer_mentions_paris(default_model_dir):
    import torch

    from lens_merge.models import load_model, load_tokenizer

    tok = load_tokenizer(default_model_dir)
    model = load_model(default_model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    reply = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply, reply


def test_tiny_tokenizer_mirrors_the_default(default_tokenizer_dir, tiny_tokenizer_dir):
    """The test-built tokenizer (tests/integration) keeps the default one's shape."""
    from transformers import AutoTokenizer

    def shape(d):
        tj = json.loads((d / "tokenizer.json").read_text())
        added = {t["id"]: (t["content"], t["special"]) for t in tj["added_tokens"]}
        return {"pre": tj["pre_tokenizer"], "decoder": tj["decoder"], "post": tj["post_processor"],
                "normalizer": tj["normalizer"], "model": tj["model"]["type"],
                "specials": [added[i] for i in range(3)],
                "template": (d / "chat_template.jinja").read_text()}

    assert shape(tiny_tokenizer_dir) == shape(default_tokenizer_dir)
    big, tiny = (AutoTokenizer.from_pretrained(d)
                 for d in (default_tokenizer_dir, tiny_tokenizer_dir))
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(tiny, attr) == getattr(big, attr), attr
    msgs = [{"role": "user", "content": "Hi"}]
    assert tiny.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        big.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
