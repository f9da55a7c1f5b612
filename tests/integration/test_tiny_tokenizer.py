"""The test-built tokenizer: SmolLM2's contract (ids, no added BOS, ChatML), deterministic,
trained on all ten default languages, and tokenized identically by llama.cpp."""

from __future__ import annotations

import json

import pytest

from lens_merge.config import DEFAULT_LANGUAGES
from lens_merge.data import load_prompts
from lens_merge.testing import (
    TINY_CONFIGS,
    TINY_TOKENIZER_PRE,
    TINY_VOCAB,
    TOKENIZER_FILES,
    build_tiny_tokenizer,
)
from tests.conftest import requires_llama


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_same_contract_as_the_default_tokenizer(tok, tiny_tokenizer_dir):
    assert type(tok).__name__ == "GPT2TokenizerFast" and len(tok) == TINY_VOCAB
    assert (tok.unk_token, tok.unk_token_id) == ("<|endoftext|>", 0)
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 2)
    assert tok("Hello").input_ids == tok("Hello", add_special_tokens=False).input_ids
    tj = json.loads((tiny_tokenizer_dir / "tokenizer.json").read_text())
    assert tj["model"]["type"] == "BPE" and tj["decoder"]["type"] == "ByteLevel"
    assert tj["post_processor"] is None
    assert [p["type"] for p in tj["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text.count("<|im_start|>") == 3 and text.endswith("<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[0] == 1 and ids[1] != 1 and ids.count(2) == 2
    assert tok.decode(tok("  ünïcødé 123 你好").input_ids) == "  ünïcødé 123 你好"
    assert tok("3333").input_ids == [tok.convert_tokens_to_ids("3")] * 4  # single digits


def test_trained_on_every_default_language(tok):
    rows = load_prompts("default", DEFAULT_LANGUAGES, split="all")
    for lang in DEFAULT_LANGUAGES:
        texts = rows.texts(lang)
        n_tok = sum(len(tok(t).input_ids) for t in texts)
        n_bytes = sum(len(t.encode()) for t in texts)
        assert n_tok / n_bytes < 0.6, (lang, n_tok / n_bytes)  # merges, not raw bytes
        assert all(tok.decode(tok(t).input_ids) == t for t in texts[:20]), lang


def test_build_is_deterministic(tiny_tokenizer_dir, tmp_path):
    again = build_tiny_tokenizer(tmp_path / "again")
    for name in TOKENIZER_FILES:
        assert (again / name).read_bytes() == (tiny_tokenizer_dir / name).read_bytes(), name


def test_tiny_models_carry_the_tokenizer(tiny_model, tiny_tokenizer_dir):
    d = tiny_model("qwen2")
    assert json.loads((d / "config.json").read_text())["vocab_size"] == TINY_VOCAB
    assert all(c["vocab_size"] == TINY_VOCAB for c in TINY_CONFIGS.values())
    for name in TOKENIZER_FILES:
        assert (d / name).read_bytes() == (tiny_tokenizer_dir / name).read_bytes(), name
    assert len(list(d.glob("model-*.safetensors"))) >= 3  # sharded, like real checkpoints


def test_gguf_export_needs_the_pre_tokenizer_named(tiny_model, tmp_path):
    from lens_merge.errors import ExportError
    from lens_merge.export.gguf import export_gguf

    src = tiny_model("llama")
    with pytest.raises(ExportError, match="--tokenizer-pre"):
        export_gguf(src, tmp_path / "x.gguf", outtype="f32")
    rep = export_gguf(src, tmp_path / "x.gguf", outtype="f32", tokenizer_pre=TINY_TOKENIZER_PRE)
    assert rep["tokenizer"]["pre"] == TINY_TOKENIZER_PRE
    assert rep["tokenizer"]["n_tokens"] == TINY_VOCAB


@requires_llama
def test_llama_cpp_tokenizes_like_transformers(tiny_model, tok, tmp_path):
    from llama_cpp import Llama

    from lens_merge.export.gguf import export_gguf
    from lens_merge.export.gguf._vocab import pretokenizer_table

    out = tmp_path / "tiny.gguf"
    export_gguf(tiny_model("llama"), out, outtype="f32", tokenizer_pre=TINY_TOKENIZER_PRE)
    llm = Llama(str(out), vocab_only=True, verbose=False)
    rows = load_prompts("default", DEFAULT_LANGUAGES, split="all", max_samples=12)
    texts = [pretokenizer_table()["check_text"], "  12 345 x2 3.14 \n\n 7\t8  "]
    texts += [t for lang in DEFAULT_LANGUAGES for t in rows.texts(lang)]
    texts += [tok.apply_chat_template([{"role": "user", "content": t}],
                                      add_generation_prompt=True, tokenize=False)
              for t in texts]
    for s in texts:
        ours = tok(s, add_special_tokens=False).input_ids
        assert ours == llm.tokenize(s.encode(), add_bos=False, special=True), s
    assert len(texts) == 2 * (2 + 12 * len(DEFAULT_LANGUAGES))
