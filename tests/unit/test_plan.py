"""The memory plan (``lens_merge.plan``): formulas against hand-computed values, parameter
counts against transformers' own modules (meta device, no weights), the paper's 8B setup on a
24 GB GPU, a 70B shape refused, and ``run`` refusing before any stage starts."""

from __future__ import annotations

import json

import pytest

from lens_merge.config import Recipe, load_recipe, with_overrides
from lens_merge.errors import ConfigError
from lens_merge.plan import PlanError, check_plan, load_shape, parse_size, plan_recipe
from lens_merge.plan import formulas as F
from lens_merge.plan.shapes import shape_from_config
from lens_merge.testing import TINY_CONFIGS
from tests.conftest import ROOT

GB = 10**9
# SmolLM2-135M-Instruct (the default model) as config.json says
SMOL = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True, "dtype": "float32"}


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_parameter_count_matches_transformers(family):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_CONFIGS[family])
    hf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    block = sum(p.numel() for p in model.base_model.layers[0].parameters())
    m = shape_from_config(TINY_CONFIGS[family], family)
    assert m.block_params == block
    assert m.params == sum(p.numel() for p in model.parameters())


def test_published_shapes():
    assert load_shape("llama3-8b").params == 8_030_261_248  # Llama-3-8B
    assert load_shape("llama3-70b").params == 70_553_706_496  # Llama-3-70B
    m = load_shape("llama3-8b")
    assert (m.d, m.f, m.n_layers, m.n_heads, m.n_kv, m.head_dim, m.vocab, m.tied, m.dtype) == \
        (4096, 14336, 32, 32, 8, 128, 128256, False, "bfloat16")


def test_formulas_by_hand():
    m = shape_from_config(TINY_CONFIGS["llama"], "tiny")  # d 64, f 128, N 4, H 4, Hkv 2, tied
    pb = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert (m.head_dim, m.block_params) == (16, 36_992) and pb == 36_992
    assert m.params == 2048 * 64 + 4 * 36_992 + 64 == 279_104
    w = F.Workload(languages=2, max_length=8, top_k=2, train_rows=3, probe_rows=3,
                   shared_pass=True, eval_rows=3, train_batch=1, cache_batch=2)
    # cache: [3 rows * 2 languages, 8, 64] fp32 + reference states [3, 2 + 1, 64] fp32
    # + the base's English next-token log-probs [3, V] fp32
    assert F.cache_bytes(m, w) == 3 * 2 * 8 * 64 * 4 + 3 * 3 * 64 * 4 + 3 * 2048 * 4 == 39_168
    # per token per block kept for backward: 3d + (H+2Hkv)hd + (H+Hkv)hd + 3H hd + 2HT + 4f
    # = 192 + 128 + 96 + 192 + 64 + 512 = 1184 elements in st, + 3d fp32
    assert F.token_train_bytes(m, 8, 4) == 1184 * 4 + 768
    assert F.token_train_bytes(m, 8, 2) == 1184 * 2 + 768
    t32 = F.train_need(m, w, gpu=False).device
    assert t32["top K blocks x 16 B/param (fp32 weights, grads, AdamW)"] == \
        2 * 36_992 * 16 + 64 * 4
    assert t32["~activations kept for backward"] == 2 * 8 * 3 * (1184 * 4 + 768) + 2 * 8 * 64 * 4
    assert t32["base copy + delta of the top K blocks, fp32"] == 2 * 36_992 * 8
    assert t32["training cache"] == 39_168
    assert t32["frozen head [V, d] (KL term)"] == 2048 * 64 * 4
    assert t32["~English next-token log-probs (KL term)"] == 1 * 2048 * 4 * 5
    off = F.train_need(m, F.Workload(**{**w.__dict__, "train_kl": False}), gpu=False).device
    assert set(t32) - set(off) == {"frozen head [V, d] (KL term)",
                                   "~English next-token log-probs (KL term)"}
    bf = F.train_need(m, F.Workload(**{**w.__dict__, "train_dtype": "bf16"}), gpu=True)
    assert bf.device["top K blocks x 18 B/param (fp32 weights, grads, AdamW, bf16 copies)"] \
        == 2 * 36_992 * 18 + 64 * 4
    assert bf.host["base copy + delta of the top K blocks, fp32 + trained copy"] == \
        2 * 36_992 * 12
    assert bf.device["frozen head [V, d] (KL term)"] == 2048 * 64 * 2
    assert bf.host["one tensor read (head)"] == 2048 * 64 * (m.dtype_bytes + 2)
    fp = F.frozen_pass(m, w, rows=3, batch=2, pooled_rows=3, cache=True, gpu=False).device
    assert fp["weights: max(embeddings, one block)"] == 2048 * 64 * 4
    assert fp["states of every prompt [rows*L, T, d]"] == 3 * 2 * 8 * 64 * 4
    assert fp["attention masks [rows*L, T, T]"] == 3 * 2 * 8 * 8 * 4
    assert fp["pooled states fp32 [N, rows*L, d]"] == 4 * 3 * 2 * 64 * 4
    assert fp["training cache (fp32, until saved)"] == 39_168
    v = F.verify_need(m, w).device  # one model at a time, 2 prompts a language kept
    assert v["one model (base + delta, then the folded one)"] == 279_104 * 4
    assert "two models (base + delta, folded)" not in v
    assert v["kept logits of every prompt [prompts, 64, V] fp32"] == 2 * 2 * 64 * 2048 * 4
    assert v["batch logits [8, 64, V] (returned, fp32, masked)"] == 8 * 64 * 2048 * 12
    # eval, per row: KV caches of base and Lens 2 x (N Hkv hd x 2 x s x (T + G)), logits
    # 16 V, prefill T (3 H T 4 + (3 f + 8 d) s)
    assert F.eval_workspace(m, w, 3) == 3 * (
        2 * 4 * 2 * 16 * 2 * 4 * (8 + 32) + 2048 * 16 + 8 * (3 * 4 * 8 * 4 + (384 + 512) * 4))


def test_eval_batch_follows_the_budget():
    m = load_shape("llama3-8b")
    w = F.Workload(languages=7, max_length=128, top_k=2, train_rows=200, probe_rows=300,
                   shared_pass=False, eval_rows=48, eval_batch=48)
    assert F.eval_batch(m, w) == 48
    small = F.Workload(**{**w.__dict__, "eval_budget": F.eval_workspace(m, w, 10)})
    assert F.eval_batch(m, small) == 10


@pytest.mark.parametrize("text,n", [("24GB", 24 * 10**9), ("24 GiB", 24 * 2**30),
                                    ("512MiB", 512 * 2**20), ("1.5T", 15 * 10**11),
                                    ("100", 100), (64, 64)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "24XB", "-1GB", "GB", "0"])
def test_parse_size_refuses(text):
    with pytest.raises(ConfigError):
        parse_size(text, "plan.memory")


def _paper(monkeypatch, **plan) -> Recipe:
    monkeypatch.chdir(ROOT)  # the recipe's data paths are relative to the checkout
    r = load_recipe(ROOT / "recipes" / "llama3-8b-instruct-7lang.yaml")
    return with_overrides(r, {f"plan.{k}": v for k, v in plan.items()})


def test_paper_setup_fits_a_24gb_gpu(monkeypatch):
    r = _paper(monkeypatch, memory="24GB", host_memory="64GB", config="llama3-8b")
    p = plan_recipe(r)
    rows = {s.name: s for s in p.stages}
    assert p.shape.params == 8_030_261_248 and p.workload.train_dtype == "bf16"
    assert p.workload.train_rows == 200 and p.workload.languages == 7
    assert [s.name for s in p.stages] == ["probe", "cache", "train", "eval", "fold", "verify",
                                          "gguf"]
    for name in ("probe", "cache", "train", "eval"):
        assert rows[name].device == "cuda" and rows[name].fits, rows[name]
        assert rows[name].device_peak < 24 * 10**9
    # two top blocks: 18 bytes per parameter (fp32 weights, grads, AdamW; bf16 autocast copies)
    assert rows["train"].device_terms[
        "top K blocks x 18 B/param (fp32 weights, grads, AdamW, bf16 copies)"] == \
        2 * 218_112_000 * 18 + 4096 * 4
    # + the base's English next-token log-probs [200, 128256] fp32 (103 MB, 3.3% of the cache)
    assert rows["cache"].cache_disk == \
        200 * 7 * 128 * 4096 * 4 + 200 * 8 * 4096 * 4 + 200 * 128_256 * 4
    # the paper's losses have no KL term: no head on the device
    assert "frozen head [V, d] (KL term)" not in rows["train"].device_terms
    assert p.fits is True
    # with one, the frozen head (bf16): 1.05 GB more, and it still fits
    kl = plan_recipe(with_overrides(r, {"train.lambda_kl": 1.0}))
    train = next(s for s in kl.stages if s.name == "train")
    assert train.device_terms["frozen head [V, d] (KL term)"] == 128_256 * 4096 * 2
    assert train.fits and train.device_peak - rows["train"].device_peak >= 128_256 * 4096 * 2


def test_paper_setup_host_stages_need_more_than_24gb_of_ram(monkeypatch):
    """GGUF verify (an fp32 reference) runs on the CPU; verify holds one bf16 model (16 GB)."""
    p = plan_recipe(_paper(monkeypatch, memory="24GB", host_memory="24GB", config="llama3-8b"))
    assert {s.name for s in p.stages if s.fits is False} == {"gguf"}
    assert all(s.short == ("device",) and s.device == "cpu" for s in p.stages if not s.fits)


def test_70b_does_not_fit_24gb(monkeypatch):
    p = plan_recipe(_paper(monkeypatch, memory="24GB", host_memory="64GB", config="llama3-70b"))
    rows = {s.name: s for s in p.stages}
    assert p.fits is False
    assert rows["train"].fits is False and "device" in rows["train"].short
    assert rows["eval"].fits is False
    assert "train needs" in p.refusal() and "on cuda (has 22.35 GiB)" in p.refusal()


def test_base_not_on_disk_needs_a_config(monkeypatch):
    from lens_merge.errors import ModelError

    with pytest.raises(ModelError, match="--config"):
        plan_recipe(_paper(monkeypatch, memory="24GB", config=None))


def _tiny_base(tmp_path, cfg: dict):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(cfg))
    return base


def test_default_recipe_fits_this_kind_of_machine(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    r = with_overrides(load_recipe(ROOT / "recipes" / "default.yaml"),
                       {"plan.memory": "24GB"})
    p = plan_recipe(r, config=_tiny_base(tmp_path, SMOL))
    assert p.shape.params == 134_515_008
    assert p.workload.shared_pass and p.workload.train_rows == 96
    assert [s.name for s in p.stages][0] == "probe+cache" and p.fits is True
    assert max(s.device_peak for s in p.stages) < 3 * 2**30


def test_run_refuses_before_any_stage(tmp_path):
    from lens_merge.release.pipeline import run_recipe

    big = {**TINY_CONFIGS["llama3"], "hidden_size": 8192, "intermediate_size": 28672,
           "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
           "vocab_size": 128256, "torch_dtype": "bfloat16"}  # a 70B shape, no weights
    out = tmp_path / "out"
    r = Recipe(name="huge", base=str(_tiny_base(tmp_path, big)), languages=["en", "zh"],
               output_dir=str(out), plan={"memory": "24GB", "host_memory": "64GB"},
               export={"onnx": None}, data={"max_train_samples": 4, "max_probe_samples": 4})
    with pytest.raises(PlanError, match="train needs") as exc:
        run_recipe(r, push=False)
    assert exc.value.plan.fits is False
    assert not out.exists()  # refused before the release folder was made
    off = with_overrides(r, {"plan.check": False})
    assert check_plan(off) is None


def test_cli_exit_codes(monkeypatch):
    from typer.testing import CliRunner

    from lens_merge.cli import app

    monkeypatch.chdir(ROOT)
    recipe = "recipes/llama3-8b-instruct-7lang.yaml"
    args = ["plan", recipe, "--memory", "24GB", "--host-memory", "64GB", "--config"]
    ok = CliRunner().invoke(app, args + ["llama3-8b"], env={"COLUMNS": "120"})
    assert ok.exit_code == 0, ok.output
    assert "train" in ok.output and "NO" not in ok.output
    no = CliRunner().invoke(app, args + ["llama3-70b"], env={"COLUMNS": "120"})
    assert no.exit_code == 1 and "does not fit: train needs" in no.output


def test_per_token_kl_adds_the_frozen_blocks_and_token_log_probs(monkeypatch):
    r = _paper(monkeypatch, memory="24GB", host_memory="64GB", config="llama3-8b")
    base = next(s for s in plan_recipe(r).stages if s.name == "train")
    p = plan_recipe(with_overrides(r, {"train.lambda_kl_tokens": 1.0}))
    train = next(s for s in p.stages if s.name == "train")
    frozen = train.device_terms["frozen copy of the top K blocks, fp32 (per-token KL)"]
    assert frozen == 2 * 218_112_000 * 4
    assert train.device_terms["frozen head [V, d] (KL term)"] == 128_256 * 4096 * 2
    logp = train.device_terms["~English log-probs at every token (per-token KL)"]
    assert logp == p.workload.train_batch * 128 * 128_256 * 4 * 5
    assert train.device_peak > base.device_peak + frozen + logp


def test_reply_kl_adds_the_replies_pass_and_the_reply_rows(monkeypatch):
    """train.lambda_kl_replies: the cache stage generates with the whole model first (the
    larger of that and the frozen pass is its peak), the cache holds the reply streams, the
    trainer the frozen blocks and the reply positions' log-probs."""
    r = _paper(monkeypatch, memory="24GB", host_memory="64GB", config="llama3-8b")
    p0 = plan_recipe(r)
    p = plan_recipe(with_overrides(r, {"train.lambda_kl_replies": 1.0, "train.reply_tokens": 32}))
    rows0, rows = ({s.name: s for s in q.stages} for q in (p0, p))
    assert p.workload.train_replies == 32 and p0.workload.train_replies == 0
    cache = rows["cache"]
    assert cache.device_terms["the whole model (replies)"] == 8_030_261_248 * 2  # bf16
    assert cache.device_peak > 16 * 10**9 and cache.fits  # still one 24 GB GPU
    n = p.workload.train_rows
    assert cache.cache_disk - rows0["cache"].cache_disk == n * ((128 + 32) * 4096 * 4 + 8)
    train = rows["train"].device_terms
    assert train["frozen copy of the top K blocks, fp32 (per-token KL)"] == 2 * 218_112_000 * 4
    assert train["~log-probs at the reply positions (reply KL)"] == \
        p.workload.train_batch * 32 * 128_256 * 20
    assert rows["train"].device_peak > rows0["train"].device_peak and rows["train"].fits


def test_english_protection_adds_moments_projectors_and_the_frozen_copy(monkeypatch):
    """train.protect_english: the frozen base blocks, per block 3 [d, d] + 1 [f, f] fp32
    moments and bases, one f64 eigh of [f, f]; the paper's 8B setup still fits 24 GB."""
    r = _paper(monkeypatch, memory="24GB", host_memory="64GB", config="llama3-8b")
    p0 = plan_recipe(r)
    p = plan_recipe(with_overrides(r, {"train.protect_english": 0.99,
                                       "train.freeze_norms": True}))
    assert p.workload.train_protect and not p0.workload.train_protect
    t0, t = ({s.name: s for s in q.stages}["train"] for q in (p0, p))
    d, f = 4096, 14336
    assert t.device_terms["English input moments + projectors"] == \
        16 * f * f + 2 * 8 * (3 * d * d + f * f)
    assert t.device_terms["frozen copy of the top K blocks, fp32 (per-token KL)"] == \
        2 * 218_112_000 * 4
    assert t.device_peak > t0.device_peak and t.fits


def test_default_recipe_has_adapters_and_one_model_rows(tmp_path, monkeypatch):
    """The default recipe's adapters row (PEFT, llama.cpp LoRA and control vector checks) and
    the one-model-at-a-time verify/onnx rows, on SmolLM2-135M's shape."""
    monkeypatch.chdir(ROOT)
    r = with_overrides(load_recipe(ROOT / "recipes" / "default.yaml"), {"plan.memory": "24GB"})
    p = plan_recipe(r, config=_tiny_base(tmp_path, SMOL))
    rows = {s.name: s for s in p.stages}
    assert [s.name for s in p.stages][-3:] == ["gguf", "onnx", "adapters"]
    assert "bench" not in rows  # no bench tasks in the default recipe
    w, P, V = p.workload, 134_515_008, 49_152
    assert (w.lora_verify, w.gguf_lora, w.cv_verify) == (True, "f16", True)
    # verify: one fp32 model, 10 languages x 2 prompts of kept logits
    v = rows["verify"].device_terms
    assert v["one model (base + delta, then the folded one)"] == P * 4
    assert v["kept logits of every prompt [prompts, 64, V] fp32"] == 20 * 64 * V * 4
    # adapters: the PEFT check is the largest (one fp32 model + factors, 4 passes of logits)
    a = rows["adapters"]
    assert a.note == "largest: PEFT check"
    dk = 2 * 3_540_096 * 4  # the delta of two SmolLM2 blocks, fp32
    assert a.device_terms["PEFT check: one fp32 model (+ its LoRA factors)"] == P * 4 + dk
    assert a.device_terms["PEFT check: kept logits of 4 passes [prompts, 64, V] fp32"] == \
        4 * 20 * 64 * V * 4
    assert a.device_peak == F.CPU_BASE + P * 4 + 2 * dk + 4 * 20 * 64 * V * 4
    # onnx: the dynamo exporter's ~2 copies of the fp32 weights (in a child), optimum's ~5
    key = "~max(export: ~2 (optimum ~5) copies; verify: PyTorch or one ONNX Runtime session)"
    assert rows["onnx"].device_terms[key] == 2 * P * 4
    opt = plan_recipe(with_overrides(r, {"export.onnx.exporter": "optimum"}), config=p.shape)
    assert next(s for s in opt.stages if s.name == "onnx").device_terms[key] == 5 * P * 4
    assert all(rows[n].device_peak < 2.5 * 2**30 for n in ("verify", "adapters"))
    # without the PEFT check the llama.cpp LoRA check is the largest
    lcpp = plan_recipe(with_overrides(r, {"export.lora": None}), config=p.shape)
    a2 = next(s for s in lcpp.stages if s.name == "adapters")
    assert a2.note == "largest: control vector check"
    assert a2.device_terms["control vector check: transformers fp32 model"] == P * 4
    assert a2.device_terms["control vector check: base GGUF (f16), mapped"] == P * 2


def test_bench_row(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    r = with_overrides(load_recipe(ROOT / "recipes" / "default.yaml"),
                       {"plan.memory": "24GB", "bench.tasks": ["xcopa_sw"],
                        "bench.batch_size": 4, "bench.dtype": "bf16"})
    p = plan_recipe(r, config=_tiny_base(tmp_path, SMOL))
    names = [s.name for s in p.stages]
    assert names.index("bench") == names.index("eval") + 1
    b = next(s for s in p.stages if s.name == "bench")
    assert b.device_terms["model in bench.dtype"] == 134_515_008 * 2
    assert b.device_terms["~batch logits [batch, 512, V] fp32 + log-softmax"] == \
        4 * 512 * 49_152 * 4 * 2
    assert b.note == "lm-eval batch 4"
