"""GGUF export: tables vs gguf's TensorNameMap, read-back with GGUFReader, llama.cpp parity.

Tiny random models (hidden 64, head_dim 16) cover every supported architecture; the real
default model (SmolLM2-135M, folded after a Lens delta) is covered by the slow tests.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import requires_llama

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

    from lens_merge.checkpoint import Checkpoint

    out = {}
    for shard in Checkpoint.open(model_dir).shards:
        with safe_open(str(shard), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k).float().numpy()
    return out


@pytest.fixture(scope="module")
def tiny(tiny_model, default_tokenizer_dir, tmp_path_factory):
    """``tiny_model`` copies with the default chat template (chat_template.jinja) added."""
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            d = tmp_path_factory.mktemp("gguf") / f"tiny-{family}"
            shutil.copytree(tiny_model(family), d)
            shutil.copy2(default_tokenizer_dir / "chat_template.jinja", d)
            made[family] = d
        return made[family]

    return make


# --- tables ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "phi3"])
def test_table_agrees_with_gguf_tensor_name_map(name):
    import gguf

    from lens_merge.architectures import get

    arch = get(name)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf["arch"].upper()], 3)
    hf_names = list(arch.global_tensors) + [n for b in range(3)
                                            for n in arch.block_tensor_names(b)]
    checked = 0
    for hf in hf_names:
        theirs = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        assert theirs == arch.gguf_name(hf), hf
        checked += 1
    assert checked == 3 + 3 * len(arch.block_tensors)


def test_registry_lists_known_exporters():
    from lens_merge.errors import ExportError
    from lens_merge.export import get

    assert get("gguf").export_gguf.__name__ == "export_gguf"
    with pytest.raises(ExportError, match="known: gguf, onnx"):
        get("tflite")


# --- tokenizer ------------------------------------------------------------------------------

def test_default_tokenizer_hashes_to_smollm(default_tokenizer_dir):
    from transformers import AutoTokenizer

    from lens_merge.export.gguf._vocab import detect_pretokenizer, pretokenizer_hash

    tok = AutoTokenizer.from_pretrained(str(default_tokenizer_dir))
    assert pretokenizer_hash(tok) == SMOLLM_HASH
    assert detect_pretokenizer(tok, default_tokenizer_dir) == ("smollm", SMOLLM_HASH)


def test_unknown_pretokenizer_is_an_error_with_the_hash(tiny, tmp_path):
    from lens_merge.errors import ExportError
    from lens_merge.export.gguf import export_gguf

    src = tiny("llama")
    d = tmp_path / "odd-pre"
    shutil.copytree(src, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True  # another pre-tokenizer
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ExportError) as ei:
        export_gguf(d, tmp_path / "x.gguf", outtype="f32")
    msg = str(ei.value)
    assert "--tokenizer-pre" in msg and "smollm" in msg
    h = msg.split("check-text hash ")[1][:64]
    assert len(h) == 64 and h != SMOLLM_HASH
    assert not (tmp_path / "x.gguf").exists()
    rep = export_gguf(d, tmp_path / "x.gguf", outtype="f32", tokenizer_pre="gpt-2")
    assert rep["tokenizer"]["pre"] == "gpt-2" and rep["tokenizer"]["pre_hash"] == h
    assert _read(tmp_path / "x.gguf")[0]["tokenizer.ggml.pre"] == "gpt-2"


# --- per-architecture export ----------------------------------------------------------------

def _expected_names(model_dir: Path) -> set[str]:
    from lens_merge.architectures import for_config
    from lens_merge.checkpoint import Checkpoint

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
    rep = export_gguf(src, out, outtype="f32", metadata={"name": "Tiny Test"})
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
    assert len(f["tokenizer.ggml.tokens"]) == 49152 == len(f["tokenizer.ggml.token_type"])
    assert len(f["tokenizer.ggml.merges"]) > 40000
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
    pytest.importorskip("llama_cpp")
    from lens_merge.export.gguf import verify_gguf

    reference: dict = {}
    v = verify_gguf(src, out, prompts=PROMPTS, max_new_tokens=8, reference=reference)
    assert v["passed"], v["failures"]
    assert v["max_abs_logit_diff"] < 5e-3  # f32 weights; llama.cpp's KV cache is f16
    assert v["top1_agreement"] == 1.0
    assert v["generations_match"] == {"fraction": 1.0, "per_prompt": [True, True]}
    assert v["tokenization_match"] == 1.0 and v["chat_template_match"] is True
    # the chat template's shared prefix counts once in the top-1 figure
    assert v["n_contexts"] < sum(p["n_tokens"] for p in v["prompts"])
    assert v["top1_agreement_all_positions"] == 1.0
    # a second output type of the same checkpoint reuses transformers' side
    assert len(reference) == len(PROMPTS)
    again = verify_gguf(src, out, prompts=PROMPTS, max_new_tokens=8, reference=reference)
    assert len(reference) == len(PROMPTS)
    assert again["max_abs_logit_diff"] == v["max_abs_logit_diff"]
    assert [r["transformers"] for r in again["prompts"]] == [r["transformers"]
                                                              for r in v["prompts"]]


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
    pytest.importorskip("llama_cpp")
    from lens_merge.export.gguf import verify_gguf

    # random tiny models have near-tied logits, so only the logit tolerance is asserted here;
    # top-1 and generation thresholds are checked on the real default model (slow tests)
    v = verify_gguf(spm_model, out, prompts=SPM_PROMPTS, max_new_tokens=4,
                    raise_on_failure=False)
    assert v["outtype"] == outtype and v["tokenization_match"] == 1.0
    assert 0 < v["max_abs_logit_diff"] <= v["thresholds"]["max_abs_logit_diff"] / 2
    if outtype in ("f16", "bf16"):
        assert v["passed"] and v["top1_agreement"] == 1.0


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
    pytest.importorskip("llama_cpp")
    from lens_merge.export.gguf import verify_gguf

    v = verify_gguf(src, tmp_path / "w48.gguf", prompts=SPM_PROMPTS, max_new_tokens=4,
                    raise_on_failure=False)
    assert v["max_abs_logit_diff"] <= v["thresholds"]["max_abs_logit_diff"] / 2


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
    from lens_merge.export.gguf import export_gguf, verify_gguf

    src = tiny("qwen2")
    export_gguf(src, tmp_path / "q.gguf", outtype="q8_0")
    v = verify_gguf(src, tmp_path / "q.gguf", prompts=PROMPTS, max_new_tokens=8)
    assert v["passed"] and v["outtype"] == "q8_0"
    assert 1e-4 < v["max_abs_logit_diff"] < v["thresholds"]["max_abs_logit_diff"]


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
    assert v["outtype"] == "q4_k_m" and v["tokenization_match"] == 1.0
    assert 0 < v["max_abs_logit_diff"] <= v["thresholds"]["max_abs_logit_diff"] / 2


def test_bf16_checkpoint_is_widened_bit_exactly(tiny_model, tmp_path):
    import torch
    from safetensors import safe_open

    from lens_merge.checkpoint import Checkpoint
    from lens_merge.export.gguf import export_gguf

    src = tiny_model("qwen2", dtype="bf16")
    rep = export_gguf(src, tmp_path / "b.gguf", outtype="f32")
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

    from lens_merge.checkpoint import Checkpoint
    from lens_merge.errors import ExportError
    from lens_merge.export.gguf import export_gguf

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
    pytest.importorskip("llama_cpp")
    from lens_merge.export.gguf import verify_gguf

    v = verify_gguf(spm_model, out, prompts=SPM_PROMPTS, max_new_tokens=8)
    assert v["passed"], v["failures"]
    assert v["tokenization_match"] == 1.0 and v["top1_agreement"] == 1.0


# --- metadata from the fold provenance --------------------------------------------------------

def test_general_metadata_from_fold_provenance(tiny, tmp_path):
    from lens_merge.export.gguf import export_gguf
    from lens_merge.fold import fold
    from lens_merge.testing import random_delta

    base = tiny("llama")
    folded = tmp_path / "Lens-Tiny" / "model"
    fold(base, random_delta(base, languages=["en", "zh", "sw"]), folded)
    rep = export_gguf(folded, tmp_path / "a.gguf", outtype="f16")
    f = _read(tmp_path / "a.gguf")[0]
    assert f["general.name"] == "Lens-Tiny" and f["general.basename"] == base.name
    assert f["general.finetune"] == "lens"
    assert f["general.languages"] == ["en", "zh", "sw"]
    assert f["general.tags"] == ["lens", "lens-merge", "multilingual"]
    assert f["general.base_model.count"] == 1
    assert f["general.base_model.0.name"] == base.name
    n_params = sum(int(np.prod(v.shape)) for v in _hf_state(base).values())
    assert rep["n_params"] == n_params and f["general.size_label"] == "3.3M"
    meta = {"name": "Lens SmolLM2", "license": "apache-2.0", "tags": ["x"],
            "base_models": [{"name": "SmolLM2-135M-Instruct", "organization": "HuggingFaceTB",
                             "repo_url": "https://huggingface.co/HuggingFaceTB/"
                                         "SmolLM2-135M-Instruct"}]}
    export_gguf(folded, tmp_path / "b.gguf", outtype="f16", metadata=meta)
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
                                 "f32", "--verify", "--language", "en"])
    assert r.exit_code == 0, r.output
    assert "verification passed" in r.output and "F32" in r.output
    assert out.is_file() and out.stat().st_size > 1_000_000
    r = CliRunner().invoke(app, ["export", "gguf", str(src), "-o", str(out)])
    assert r.exit_code == 1 and "--overwrite" in str(r.exception)


# --- the real default model, folded after Lens ------------------------------------------------

@pytest.fixture(scope="module")
def folded_default(default_model_dir, tmp_path_factory):
    from lens_merge.fold import fold
    from lens_merge.testing import random_delta

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
        assert v["passed"], v["failures"]
        assert v["chat_template_match"] is True and v["tokenization_match"] == 1.0
        if outtype == "f32":
            assert v["top1_agreement"] == 1.0 and v["max_abs_logit_diff"] < 0.1
        if outtype == "f16":
            assert v["generations_match"]["fraction"] == 1.0, v["prompts"]
            assert len(v["languages"]) == 10
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
    assert v["passed"], v["failures"]
