"""GGUF export: tables vs gguf's TensorNameMap, read-back with GGUFReader, llama.cpp parity.

Tiny random models (hidden 64, head_dim 16, the test tokenizer of ``lens_merge.testing``)
cover every supported architecture; the real default model (SmolLM2-135M, folded after a Lens
delta) is covered by the slow tests.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from lens_merge.testing import TINY_TOKENIZER_PRE, TINY_VOCAB
from tests.conftest import requires_llama

PRE = TINY_TOKENIZER_PRE  # the test tokenizer's hash is new to the exporter: named explicitly
SMOLLM_HASH = "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "phi3", "phi3-longrope"]
PROMPTS = ["How long should I boil an egg?", "煮溏心蛋需要煮多长时间？"]


def _read(path: Path) -> tuple[dict, dict]:
    """(key -> value, tensor name -> ReaderTensor) of a GGUF, with gguf's own reader."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


def _hf_state(model_dir: Path) -> dict:
    from safetensors import safe_open

    from lens_merge.weights.checkpoint import Checkpoint

    out = {}
    for shard in Checkpoint.open(model_dir).shards:
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k).float().numpy()
    return out


def _limits(report) -> dict[str, float]:
    """Metric -> limit of a ParityReport's checks."""
    return {c.name: c.limit for c in report.checks}


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """``tiny_model`` (the test tokenizer carries SmolLM2's ChatML chat_template.jinja)."""

    def make(family: str) -> Path:
        d = tiny_model(family)
        assert (d / "chat_template.jinja").is_file()
        return d

    return make


def _have_llama() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


# --- tables ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "phi3"])
def test_table_agrees_with_gguf_tensor_name_map(name):
    import gguf

    from lens_merge.architectures import get
    from lens_merge.export.gguf._tensors import gguf_name_map, gguf_tensor_name

    arch = get(name)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf["arch"].upper()], 3)
    ours = gguf_name_map(arch.gguf["arch"], 3)  # what the exporter reads: gguf-py's own map
    hf_names = list(arch.global_tensors) + [n for b in range(3)
                                            for n in arch.block_tensor_names(b)]
    checked = 0
    for hf in hf_names:
        theirs = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        assert theirs == arch.gguf_name(hf), hf
        assert gguf_tensor_name(ours, hf) == theirs is not None, hf
        checked += 1
    assert checked == 3 + 3 * len(arch.block_tensors)
    assert gguf_tensor_name(ours, "model.layers.0.mlp.not_a_tensor.weight") is None


def test_unknown_gguf_architecture_is_an_error():
    from lens_merge.errors import ExportError
    from lens_merge.export.gguf._tensors import gguf_name_map

    with pytest.raises(ExportError, match="does not know the GGUF architecture 'nope'"):
        gguf_name_map("nope", 2)


def test_default_base_identity_has_one_home(tmp_path, monkeypatch):
    """``default`` without a materialized marker still names the Hub base and its license,
    from ``lens_merge.default_model``."""
    import lens_merge.export.gguf._metadata as md
    from lens_merge.default_model import BASE_MODEL_ID, BASE_MODEL_LICENSE

    assert BASE_MODEL_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.setattr(md, "default_model_dir", lambda: tmp_path / "absent")
    entry, lic = md.describe_base("default")
    assert lic == BASE_MODEL_LICENSE == "apache-2.0"
    assert entry == {"name": "SmolLM2-135M-Instruct", "organization": "HuggingFaceTB",
                     "repo_url": "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"}


# --- thresholds -------------------------------------------------------------------------------

def test_every_gguf_threshold_can_fail():
    """Each output type's limits: a perfect result passes every check, and for each check a
    bad value fails exactly that one; no limit is a no-op (>= 0 or <= inf)."""
    from lens_merge.export.gguf import OUTTYPES
    from lens_merge.parity.thresholds import LOWER_IS_BETTER, THRESHOLDS, checks_for

    rows = THRESHOLDS["gguf"]
    assert set(rows) == set(OUTTYPES)  # every output type is verified
    perfect = {"max_abs_logit_diff": 0.0, "top1_agreement": 1.0, "generation_match": 1.0,
               "first_token_agreement": 1.0, "top1_agreement_all_positions": 1.0}
    for outtype, row in rows.items():
        assert "max_abs_logit_diff" in row and "top1_agreement" in row, outtype
        assert {"generation_match", "first_token_agreement"} & set(row), outtype
        assert all(c.passed for c in checks_for(row, perfect)), outtype
        for name, limit in row.items():
            assert name in perfect, (outtype, name)
            if name in LOWER_IS_BETTER:
                assert 0 < limit < math.inf, (outtype, name)
                bad = {**perfect, name: 2 * limit}
            else:
                assert 0 < limit <= 1, (outtype, name)  # >= 0 could never fail
                bad = {**perfect, name: 0.0}
            failed = [c.name for c in checks_for(row, bad) if not c.passed]
            assert failed == [name], (outtype, name)
        missing = checks_for(row, {})
        assert missing and not any(c.passed for c in missing), outtype


def test_gguf_thresholds_left_the_exporter():
    import lens_merge.export.gguf as g
    import lens_merge.export.gguf._verify as v

    assert not hasattr(g, "THRESHOLDS") and not hasattr(v, "_default_prompts")
    assert not hasattr(v, "_checkpoint_languages") and not hasattr(v, "_failures")


def test_registry_lists_known_exporters():
    from lens_merge.errors import ExportError
    from lens_merge.export import get

    assert get("gguf").export_gguf.__name__ == "export_gguf"
    with pytest.raises(ExportError, match="known: gguf, onnx"):
        get("tflite")


# --- tokenizer ------------------------------------------------------------------------------


def test_unknown_pretokenizer_is_an_error_with_the_hash(tiny, tmp_path):
    from lens_merge.errors import ExportError
    from lens_merge.export.gguf import export_gguf

    src = tiny("llama")
    d = tmp_path / "odd-pre"
    shutil.copytree(src, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    with pytest.raises(ExportError) as ei:  # the test tokenizer's own hash is unknown
        export_gguf(d, tmp_path / "x.gguf", outtype="f32")
    own = str(ei.value).split("check-text hash ")[1][:64]
    tj["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True  # another pre-tokenizer
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ExportError) as ei:
        export_gguf(d, tmp_path / "x.gguf", outtype="f32")
    msg = str(ei.value)
    assert "--tokenizer-pre" in msg and "smollm" in msg
    h = msg.split("check-text hash ")[1][:64]
    assert len(h) == 64 and h not in (SMOLLM_HASH, own)
    assert not (tmp_path / "x.gguf").exists()
    rep = export_gguf(d, tmp_path / "x.gguf", outtype="f32", tokenizer_pre="gpt-2")
    assert rep["tokenizer"]["pre"] == "gpt-2" and rep["tokenizer"]["pre_hash"] == h
    assert _read(tmp_path / "x.gguf")[0]["tokenizer.ggml.pre"] == "gpt-2"


# --- per-architecture export ----------------------------------------------------------------

def _expected_names(model_dir: Path) -> set[str]:
    from lens_merge.architectures import for_config
    from lens_merge.weights.checkpoint import Checkpoint

    ck = Checkpoint.open(model_dir)
    arch = for_config(ck.config())
    return {arch.gguf_name(n) for n in ck.tensor_names()}


@pytest.mark.parametrize("family", FAMILIES)
def test_export_reads_back_and_runs_in_llama_cpp(family, tiny, tmp_path):
    import gguf

    from lens_merge.architectures import for_config
    from lens_merge.export.gguf import export_gguf
    from lens_merge.export.gguf._hparams import llama3_rope_factors
    from lens_merge.export.gguf._tensors import permute_rope

    src = tiny(family)
    cfg = json.loads((src / "config.json").read_text())
    out = tmp_path / f"{family}.gguf"
    # a general.name containing "phi3" makes llama.cpp patch Phi-3's own special tokens (</s>),
    # which the borrowed SmolLM2 vocabulary lacks; real Phi-3 tokenizers have them
    rep = export_gguf(src, out, outtype="f32", metadata={"name": "Tiny Test"},
                      tokenizer_pre=PRE)
    arch = rep["architecture"]
    f, t = _read(out)
    # keys
    assert f["general.architecture"] == arch
    assert f["general.type"] == "model" and f["general.name"] == "Tiny Test"
    assert f["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    assert f["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    assert f["general.size_label"] == rep["metadata"]["size_label"]
    assert f[f"{arch}.block_count"] == 4 and f[f"{arch}.embedding_length"] == 64
    assert f[f"{arch}.feed_forward_length"] == 128
    assert f[f"{arch}.attention.head_count"] == 4
    assert f[f"{arch}.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert f[f"{arch}.context_length"] == cfg["max_position_embeddings"]
    assert f[f"{arch}.rope.dimension_count"] == 16
    assert f[f"{arch}.rope.freq_base"] == pytest.approx(cfg["rope_theta"])
    assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "smollm"
    assert len(f["tokenizer.ggml.tokens"]) == TINY_VOCAB == len(f["tokenizer.ggml.token_type"])
    merges = json.loads((src / "tokenizer.json").read_text())["model"]["merges"]
    assert len(f["tokenizer.ggml.merges"]) == len(merges) > 1000
    assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.eos_token_id"] == 2
    assert f["tokenizer.ggml.eot_token_id"] == 2 and f["tokenizer.ggml.unknown_token_id"] == 0
    assert f["tokenizer.ggml.padding_token_id"] == 2
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in f["tokenizer.chat_template"]
    # tensors: names from the table, shapes, F32 everywhere
    expected = _expected_names(src)
    if cfg.get("tie_word_embeddings"):
        assert "output.weight" not in t
    extra = {"llama3": {"rope_freqs.weight"},
             "phi3-longrope": {"rope_factors_long.weight", "rope_factors_short.weight"}}
    assert set(t) == expected | extra.get(family, set())
    hf = _hf_state(src)
    for name, ti in t.items():
        assert ti.tensor_type == gguf.GGMLQuantizationType.F32, name
    table = for_config(cfg)
    for hf_name, w in hf.items():  # every weight, in its HF shape (GGUF stores ne reversed)
        g = table.gguf_name(hf_name)
        assert np.asarray(t[g].data).shape == w.shape, g
        assert tuple(int(x) for x in t[g].shape) == tuple(reversed(w.shape)), g
    if arch == "phi3":  # fused qkv and gate_up stay fused (llama.cpp splits them itself)
        assert np.array_equal(np.asarray(t["blk.1.attn_qkv.weight"].data),
                              hf["model.layers.1.self_attn.qkv_proj.weight"])
        assert t["blk.1.ffn_up.weight"].data.shape == (256, 64)
        assert "blk.1.ffn_gate.weight" not in t
        q_hf = q_gguf = None
    else:
        q_hf = hf["model.layers.1.self_attn.q_proj.weight"]
        q_gguf = np.asarray(t["blk.1.attn_q.weight"].data)
    if arch == "llama":  # permuted to llama.cpp's interleaved RoPE layout, bit for bit
        assert np.array_equal(q_gguf, permute_rope(q_hf, 4))
        assert not np.array_equal(q_gguf, q_hf)
        k_hf = hf["model.layers.1.self_attn.k_proj.weight"]
        assert np.array_equal(np.asarray(t["blk.1.attn_k.weight"].data),
                              permute_rope(k_hf, cfg["num_key_value_heads"]))
    elif arch in ("qwen2", "qwen3"):
        assert np.array_equal(q_gguf, q_hf)
    if family == "llama3":
        factors = np.asarray(t["rope_freqs.weight"].data)
        assert factors.shape == (8,) and np.allclose(factors, llama3_rope_factors(cfg))
        assert factors[0] == 1.0 and factors[-1] == 8.0
    if family == "phi3-longrope":
        assert np.allclose(t["rope_factors_long.weight"].data,
                           cfg["rope_scaling"]["long_factor"])
        scale = cfg["max_position_embeddings"] / cfg["original_max_position_embeddings"]
        assert f["phi3.rope.scaling.attn_factor"] == pytest.approx(
            math.sqrt(1 + math.log(scale) / math.log(4096)))
        assert f["phi3.rope.scaling.original_context_length"] == 4096
    if arch == "qwen3":
        assert f["qwen3.attention.key_length"] == 16
    # real llama.cpp vs transformers
    if not _have_llama():
        pytest.skip("needs llama-cpp-python: pip install '.[llama]'")
    from lens_merge.export.gguf import verify_gguf
    from lens_merge.parity.reference import References

    reference = References(src, tmp_path / "reference")
    v = verify_gguf(src, out, prompts=PROMPTS, max_new_tokens=8, reference=reference)
    assert v.passed, v.failures
    assert v.kind == "gguf" and v.variant == "f32" and v.subject == str(out)
    assert v.problems == [] and v.n_prompts == 2 and v.languages == ["custom"]
    m = v.metrics
    assert m["max_abs_logit_diff"] < 5e-3  # f32 weights; llama.cpp's KV cache is f16
    assert m["top1_agreement"] == 1.0
    assert m["generation_match"] == 1.0 == m["first_token_agreement"]
    assert [p["generation_match"] for p in v.details["prompts"]] == [True, True]
    assert [p["first_mismatch"] for p in v.details["prompts"]] == [None, None]
    assert m["tokenization_match"] == 1.0 and v.details["chat_template_match"] is True
    # the chat template's shared prefix counts once in the top-1 figure
    assert m["n_contexts"] < sum(p["n_tokens"] for p in v.details["prompts"]) == m["n_positions"]
    assert m["top1_agreement_all_positions"] == 1.0
    assert v.per_language["custom"]["n_prompts"] == 2
    assert [c.name for c in v.checks] == ["max_abs_logit_diff", "top1_agreement",
                                          "generation_match"]  # THRESHOLDS["gguf"]["f32"]
    # a second output type of the same checkpoint reuses transformers' side, and so does a
    # later check that reads it from the folder
    assert reference.computed == len(PROMPTS)
    again = verify_gguf(src, out, prompts=PROMPTS, max_new_tokens=8, reference=reference)
    assert reference.computed == len(PROMPTS)
    assert again.metrics["max_abs_logit_diff"] == m["max_abs_logit_diff"]
    read = References(src, tmp_path / "reference")
    third = verify_gguf(src, out, prompts=PROMPTS, max_new_tokens=8, reference=read)
    assert read.computed == 0 and third.metrics == m
    assert [r["transformers"] for r in again.details["prompts"]] == [
        r["transformers"] for r in v.details["prompts"]]


# --- SentencePiece ----------------------------------------------------------------------------

SPM_TEXT = ["The quick brown fox jumps over the lazy dog.", "Hello world, this is a test.",
            "Boil the egg for six minutes for a soft yolk.", "Language models read tokens.",
            "Numbers like 123 and 4567 appear here.", "A small vocabulary is enough."] * 20
SPM_PROMPTS = ["Hello world, the quick fox.", "Boil 123 eggs!"]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    import sentencepiece as spm
    from transformers import LlamaTokenizerFast

    from lens_merge.testing import TINY_CONFIGS, build_random_model

    d = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_TEXT), model_prefix=str(d / "sp"), vocab_size=320,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    tok = LlamaTokenizerFast(vocab_file=str(d / "sp.model"), legacy=False, add_bos_token=True,
                             add_prefix_space=True)  # as sentencepiece: a dummy prefix
    cfg = {**TINY_CONFIGS["llama"], "vocab_size": len(tok)}
    out = build_random_model(cfg, d / "model")
    tok.save_pretrained(str(out))
    return out


# --- output types (small-vocab SentencePiece model: fast to write and read back) -------------

@pytest.mark.parametrize("outtype,qtype", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0"),
                                           ("q5_1", "Q5_1"), ("q5_0", "Q5_0"),
                                           ("q4_1", "Q4_1"), ("q4_0", "Q4_0")])
def test_pure_python_types(outtype, qtype, spm_model, tmp_path):
    import gguf
    from gguf.quants import dequantize

    from lens_merge.export.gguf import export_gguf
    from lens_merge.export.gguf._tensors import permute_rope

    out = tmp_path / f"m-{outtype}.gguf"
    rep = export_gguf(spm_model, out, outtype=outtype)
    f, t = _read(out)
    low_bit = qtype in ("Q5_1", "Q5_0", "Q4_1", "Q4_0")
    if low_bit:  # tied embeddings are the output head: kept at Q8_0
        assert [(fb["tensor"], fb["used"]) for fb in rep["fallbacks"]] == [
            ("token_embd.weight", "Q8_0")]
        assert "output head" in rep["fallbacks"][0]["reason"]
        assert rep["tensor_types"] == {"F32": 9, qtype: 28, "Q8_0": 1}
    else:
        assert rep["fallbacks"] == []
        assert rep["tensor_types"] == {"F32": 9, qtype: 29}  # 4x2 norms + final; 4x7 + embd
    for name, ti in t.items():
        want = ("F32" if name.endswith("norm.weight") else
                "Q8_0" if low_bit and name == "token_embd.weight" else qtype)
        assert ti.tensor_type.name == want, name
    assert f["general.file_type"] == int(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    w = permute_rope(_hf_state(spm_model)["model.layers.0.self_attn.q_proj.weight"], 4)
    ti = t["blk.0.attn_q.weight"]
    back = dequantize(np.asarray(ti.data), ti.tensor_type).reshape(w.shape)
    bound = {"F16": 1e-3, "BF16": 8e-3, "Q8_0": 1 / 127, "Q5_1": 1 / 31, "Q5_0": 1 / 15,
             "Q4_1": 1 / 15, "Q4_0": 1 / 7}[qtype]
    err = np.abs(back - w).max()
    assert 0 < err <= bound * np.abs(w).max()
    if not _have_llama():
        pytest.skip("needs llama-cpp-python: pip install '.[llama]'")
    from lens_merge.export.gguf import verify_gguf

    # random tiny models have near-tied logits, so only the logit tolerance is asserted here;
    # top-1 and generation thresholds are checked on the real default model (slow tests)
    v = verify_gguf(spm_model, out, prompts=SPM_PROMPTS, max_new_tokens=4,
                    raise_on_failure=False)
    assert v.variant == outtype and v.metrics["tokenization_match"] == 1.0 and not v.problems
    assert 0 < v.metrics["max_abs_logit_diff"] <= _limits(v)["max_abs_logit_diff"] / 2
    assert 0 <= v.metrics["first_token_agreement"] <= 1  # reported for every type
    if outtype in ("f16", "bf16"):
        assert v.passed and v.metrics["top1_agreement"] == 1.0


def test_rows_not_divisible_by_block_fall_back_to_f16(spm_model, tmp_path):
    from lens_merge.export.gguf import export_gguf
    from lens_merge.testing import TINY_CONFIGS, build_random_model

    n_vocab = json.loads((spm_model / "config.json").read_text())["vocab_size"]
    cfg = {**TINY_CONFIGS["llama"], "hidden_size": 48, "num_attention_heads": 3,
           "num_key_value_heads": 3, "intermediate_size": 96, "vocab_size": n_vocab}
    src = build_random_model(cfg, tmp_path / "w48")
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        shutil.copy2(spm_model / name, src / name)
    rep = export_gguf(src, tmp_path / "w48.gguf", outtype="q8_0")
    fell = {fb["tensor"] for fb in rep["fallbacks"]}
    # every tensor reading 48-wide rows: q/k/v/o, gate/up and the embeddings; down reads 96
    assert fell == {"token_embd.weight"} | {f"blk.{b}.{n}.weight" for b in range(4) for n in
                                            ("attn_q", "attn_k", "attn_v", "attn_output",
                                             "ffn_gate", "ffn_up")}
    assert all(fb["used"] == "F16" and "48" in fb["reason"] for fb in rep["fallbacks"])
    assert rep["tensor_types"] == {"F32": 9, "F16": 25, "Q8_0": 4}
    assert {k: v for k, v in _read(tmp_path / "w48.gguf")[1].items()
            if v.tensor_type.name == "Q8_0"}.keys() == {f"blk.{b}.ffn_down.weight"
                                                         for b in range(4)}
    if not _have_llama():
        pytest.skip("needs llama-cpp-python: pip install '.[llama]'")
    from lens_merge.export.gguf import verify_gguf

    v = verify_gguf(src, tmp_path / "w48.gguf", prompts=SPM_PROMPTS, max_new_tokens=4,
                    raise_on_failure=False)
    assert v.metrics["max_abs_logit_diff"] <= _limits(v)["max_abs_logit_diff"] / 2


@requires_llama
@pytest.mark.parametrize("outtype", ["q8_0", "q5_1", "q4_0"])
def test_python_quants_are_bit_exact_with_llama_cpp(outtype, spm_model, tmp_path):
    """Our streamed pure-Python file vs llama.cpp's quantizer run on our f32 file."""
    from lens_merge.export.gguf import export_gguf, get_outtype
    from lens_merge.export.gguf._quantize import quantize_with_llama_cpp

    export_gguf(spm_model, tmp_path / "f32.gguf", outtype="f32")
    export_gguf(spm_model, tmp_path / "py.gguf", outtype=outtype)
    quantize_with_llama_cpp(tmp_path / "f32.gguf", tmp_path / "cpp.gguf", get_outtype(outtype))
    (fa, a), (fb, b) = _read(tmp_path / "py.gguf"), _read(tmp_path / "cpp.gguf")
    assert set(a) == set(b) and fa["general.file_type"] == fb["general.file_type"]
    blocks = [n for n in a if n.startswith("blk.")]
    assert len(blocks) == 4 * 9
    for n in blocks:  # llama.cpp picks its own type for the output head; blocks must agree
        assert a[n].tensor_type == b[n].tensor_type, n
        assert np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data)), n


@requires_llama
def test_quantized_bpe_model_runs_in_llama_cpp(tiny, tmp_path):
    from lens_merge.errors import ExportError, VerificationError
    from lens_merge.export.gguf import export_gguf, verify_gguf

    src = tiny("qwen2")
    export_gguf(src, tmp_path / "q.gguf", outtype="q8_0", tokenizer_pre=PRE)
    v = verify_gguf(src, tmp_path / "q.gguf", prompts=PROMPTS, max_new_tokens=8)
    assert v.passed and v.variant == "q8_0"
    assert 1e-4 < v.metrics["max_abs_logit_diff"] < _limits(v)["max_abs_logit_diff"]
    with pytest.raises(VerificationError) as ei:  # the same file held to f32's limits fails
        verify_gguf(src, tmp_path / "q.gguf", prompts=PROMPTS, max_new_tokens=8,
                    outtype="f32")
    strict = ei.value.report
    assert strict.variant == "f32" and not strict.passed and strict.problems == []
    assert strict.metrics == v.metrics  # same numbers, stricter limits
    failed = [c.name for c in strict.checks if not c.passed]
    assert failed and set(failed) <= {"max_abs_logit_diff", "top1_agreement",
                                      "generation_match"}
    assert len(strict.failures) == len(failed)
    with pytest.raises(ExportError, match="no verification thresholds"):
        verify_gguf(src, tmp_path / "q.gguf", prompts=PROMPTS, outtype="q2_k")


@requires_llama
def test_kquant_via_llama_cpp_on_tiny_model(spm_model, tmp_path):
    from lens_merge.export.gguf import export_gguf, verify_gguf

    rep = export_gguf(spm_model, tmp_path / "k.gguf", outtype="q4_k_m")
    q8 = export_gguf(spm_model, tmp_path / "q8.gguf", outtype="q8_0")
    assert rep["intermediate"] == "f32" and rep["bytes"] < q8["bytes"]
    # 64-wide rows are not multiples of 256: llama.cpp falls back for every 2-D tensor
    assert len(rep["fallbacks"]) == 29 and not any("_K" in t for t in rep["tensor_types"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp files gone
    v = verify_gguf(spm_model, tmp_path / "k.gguf", prompts=SPM_PROMPTS, max_new_tokens=4,
                    raise_on_failure=False)
    assert v.variant == "q4_k_m" and v.metrics["tokenization_match"] == 1.0
    assert 0 < v.metrics["max_abs_logit_diff"] <= _limits(v)["max_abs_logit_diff"] / 2
    assert "first_token_agreement" in _limits(v)  # low-bit types: a check that can fail


def test_bf16_checkpoint_is_widened_bit_exactly(tiny_model, tmp_path):
    import torch
    from safetensors import safe_open

    from lens_merge.export.gguf import export_gguf
    from lens_merge.weights.checkpoint import Checkpoint

    src = tiny_model("qwen2", dtype="bf16")
    rep = export_gguf(src, tmp_path / "b.gguf", outtype="f32", tokenizer_pre=PRE)
    assert rep["source_dtype"] == "BF16"
    t = _read(tmp_path / "b.gguf")[1]
    with safe_open(str(Checkpoint.open(src).entry("model.layers.2.mlp.up_proj.weight").shard),
                   framework="pt") as f:
        w = f.get_tensor("model.layers.2.mlp.up_proj.weight")
    assert w.dtype == torch.bfloat16
    assert np.array_equal(np.asarray(t["blk.2.ffn_up.weight"].data), w.float().numpy())


def test_kquant_without_llama_extra_names_the_extra(spm_model, tmp_path, monkeypatch):
    import sys

    from lens_merge.errors import ExportError
    from lens_merge.export.gguf import export_gguf

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if the extra were not installed
    with pytest.raises(ExportError, match=r"lens-merge\[llama\]"):
        export_gguf(spm_model, tmp_path / "k.gguf", outtype="q4_k_m")
    assert not (tmp_path / "k.gguf").exists()


def test_unknown_outtype_and_architecture(tiny, tmp_path):
    from lens_merge.errors import ExportError
    from lens_merge.export.gguf import export_gguf

    with pytest.raises(ExportError, match="supported: f32, f16, bf16, q8_0"):
        export_gguf(tiny("llama"), tmp_path / "x.gguf", outtype="q3_k_s")
    with pytest.raises(ExportError, match="'gemma2' cannot be exported to GGUF; supported: "
                                          "llama, mistral, phi3, qwen2, qwen3"):
        export_gguf(tiny("gemma2"), tmp_path / "x.gguf")


def test_failed_export_leaves_nothing(spm_model, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from lens_merge.errors import ExportError
    from lens_merge.export.gguf import export_gguf
    from lens_merge.weights.checkpoint import Checkpoint

    d = tmp_path / "nan"
    shutil.copytree(spm_model, d)
    shard = Checkpoint.open(d).shards[-1]
    sd = load_file(str(shard))
    name = next(n for n in sorted(sd) if sd[n].ndim == 2)
    sd[name].view(-1)[0] = torch.nan
    save_file(sd, str(shard), metadata={"format": "pt"})
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(ExportError, match=f"{name} holds NaN"):
        export_gguf(d, out, outtype="q8_0")
    assert list(out.parent.iterdir()) == []


def test_sentencepiece_vocab_exports_and_runs(spm_model, tmp_path):
    from lens_merge.export.gguf import export_gguf

    out = tmp_path / "spm.gguf"
    rep = export_gguf(spm_model, out, outtype="f32")
    f = _read(out)[0]
    assert rep["tokenizer"]["model"] == "llama" and f["tokenizer.ggml.pre"] == "default"
    n = json.loads((spm_model / "config.json").read_text())["vocab_size"]
    assert len(f["tokenizer.ggml.tokens"]) == len(f["tokenizer.ggml.scores"]) == n
    types = f["tokenizer.ggml.token_type"]
    assert types[:3] == [2, 3, 3]  # unk, <s>, </s>
    assert types.count(6) == 256  # byte-fallback pieces
    assert f["tokenizer.ggml.tokens"][3] == "<0x00>"
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.ggml.add_space_prefix"] is True
    assert "tokenizer.ggml.merges" not in f
    if not _have_llama():
        pytest.skip("needs llama-cpp-python: pip install '.[llama]'")
    from lens_merge.export.gguf import verify_gguf

    v = verify_gguf(spm_model, out, prompts=SPM_PROMPTS, max_new_tokens=8)
    assert v.passed, v.failures
    assert v.metrics["tokenization_match"] == 1.0 and v.metrics["top1_agreement"] == 1.0
    assert v.details["chat_template_match"] is None  # no template: nothing to compare


# --- metadata from the fold provenance --------------------------------------------------------

def test_general_metadata_from_fold_provenance(tiny, tmp_path):
    from lens_merge.export.gguf import export_gguf
    from lens_merge.testing import random_delta
    from lens_merge.weights.fold import fold

    base = tiny("llama")
    folded = tmp_path / "Lens-Tiny" / "model"
    fold(base, random_delta(base, languages=["en", "zh", "sw"]), folded)
    rep = export_gguf(folded, tmp_path / "a.gguf", outtype="f16", tokenizer_pre=PRE)
    f = _read(tmp_path / "a.gguf")[0]
    assert f["general.name"] == "Lens-Tiny" and f["general.basename"] == base.name
    assert f["general.finetune"] == "lens"
    assert f["general.languages"] == ["en", "zh", "sw"]
    assert f["general.tags"] == ["lens", "lens-merge", "multilingual"]
    assert f["general.base_model.count"] == 1
    assert f["general.base_model.0.name"] == base.name
    n_params = sum(int(np.prod(v.shape)) for v in _hf_state(base).values())
    assert rep["n_params"] == n_params == 279104 and f["general.size_label"] == "279K"
    meta = {"name": "Lens SmolLM2", "license": "apache-2.0", "tags": ["x"],
            "base_models": [{"name": "SmolLM2-135M-Instruct", "organization": "HuggingFaceTB",
                             "repo_url": "https://huggingface.co/HuggingFaceTB/"
                                         "SmolLM2-135M-Instruct"}]}
    export_gguf(folded, tmp_path / "b.gguf", outtype="f16", metadata=meta, tokenizer_pre=PRE)
    f = _read(tmp_path / "b.gguf")[0]
    assert f["general.name"] == "Lens SmolLM2" and f["general.license"] == "apache-2.0"
    assert f["general.tags"] == ["x"] and f["general.base_model.0.organization"] == "HuggingFaceTB"
    assert f["general.base_model.0.repo_url"].endswith("/HuggingFaceTB/SmolLM2-135M-Instruct")


# --- CLI ------------------------------------------------------------------------------------

@requires_llama
def test_cli_export_and_verify(tiny, tmp_path):
    from typer.testing import CliRunner

    from lens_merge.cli import app

    src = tiny("qwen3")
    out = tmp_path / "cli.gguf"
    r = CliRunner().invoke(app, ["export", "gguf", str(src), "-o", str(out), "--outtype",
                                 "f32", "--verify", "--language", "en", "--tokenizer-pre", PRE])
    assert r.exit_code == 0, r.output
    assert "verification passed" in r.output and "F32" in r.output
    assert "gguf f32" in r.output and "max_abs_logit_diff" in r.output  # print_parity
    assert "same first" in r.output  # the per-prompt table
    assert out.is_file() and out.stat().st_size > 1_000_000
    r = CliRunner().invoke(app, ["export", "gguf", str(src), "-o", str(out)])
    assert r.exit_code == 1 and "--overwrite" in str(r.exception)


# --- the real default model, folded after Lens ------------------------------------------------


def test_two_exports_have_the_same_sha256(spm_model, tmp_path, monkeypatch):
    """No creation time in the file (like llama.cpp's converter): the same checkpoint gives
    the same bytes; SOURCE_DATE_EPOCH stamps a fixed time."""
    import hashlib

    from lens_merge.export.gguf import export_gguf

    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    export_gguf(spm_model, a, outtype="q8_0")
    export_gguf(spm_model, b, outtype="q8_0")
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    fields, _ = _read(a)
    assert "lens_merge.created" not in fields
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    export_gguf(spm_model, c := tmp_path / "c.gguf", outtype="q8_0")
    assert _read(c)[0]["lens_merge.created"] == "2023-11-14T22:13:20+00:00"


def test_output_inside_the_checkpoint_is_refused(tiny, tmp_path):
    """Issue 11: `export gguf W/f2 -o W/f2/model-00002-of-0000N.safetensors --overwrite` used to
    replace a shard of its own input with a GGUF, exit 0."""
    from typer.testing import CliRunner

    from lens_merge.cli import app

    src = tmp_path / "f2"
    shutil.copytree(tiny("llama"), src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    shard = sorted(src.glob("model-*.safetensors"))[1]
    for out in (shard, src, tmp_path):
        r = CliRunner().invoke(app, ["export", "gguf", str(src), "-o", str(out), "--outtype",
                                     "f16", "--overwrite", "--tokenizer-pre", PRE])
        assert r.exit_code == 1, r.output
        assert type(r.exception).__name__ == "OutputError"
        assert "choose an output outside the inputs" in str(r.exception)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
