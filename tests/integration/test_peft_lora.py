"""PEFT LoRA export on tiny random models: PeftModel.from_pretrained vs base + delta."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lens_merge.adapters.peft_lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PARITY_FILE,
    PROVENANCE,
    export_peft_lora,
    verify_peft_lora,
)
from lens_merge.errors import AdapterError, OutputError
from lens_merge.testing import TINY_CONFIGS, build_random_model, random_delta
from lens_merge.weights.delta import LensDelta
from tests.conftest import requires_peft

pytestmark = requires_peft
FAMILIES = sorted(TINY_CONFIGS)


def _saved_delta(model_dir, tmp_path, **kw):
    d = random_delta(model_dir, top_k=2, scale=0.01, **kw)
    return d.save(tmp_path / "delta")


def _show(tag, rep):
    m = rep.metrics
    print(f"{tag}: {rep.variant} max|dlogit| {m['max_abs_logit_diff']:.3g} top-1 "
          f"{m['top1_agreement']:.4f} PEFT-vs-files {m['adapter_max_abs_logit_diff']:.3g} "
          f"dropped cost {m.get('dropped_max_abs_logit_diff')} size ratio {m['size_ratio']:.3f}")


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_adapter_equals_folded(family, tiny_model, tmp_path):
    model = tiny_model(family)
    delta = _saved_delta(model, tmp_path)
    out = tmp_path / "adapter"
    rep = export_peft_lora(delta, out, base=model)
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["layers_to_transform"] == [2, 3]
    assert isinstance(cfg["target_modules"], list) and "o_proj" in cfg["target_modules"]
    assert cfg["lora_alpha"] == cfg["r"] == rep["max_rank"] == 64
    assert all(cfg["alpha_pattern"][k] == v for k, v in cfg["rank_pattern"].items())
    assert rep["dropped"] == {} and rep["carried"]  # every norm rides in modules_to_save
    prov = json.loads((out / PROVENANCE).read_text())
    assert all(t["rel_error"] < 1e-5 for t in prov["tensors"].values())
    v = verify_peft_lora(model, out)
    _show(family, v)
    assert v.passed and v.variant == "full_rank"
    assert v["max_abs_logit_diff"] <= 1e-4 and v["adapter_max_abs_logit_diff"] <= 1e-4
    assert v["top1_agreement"] == 1.0
    assert json.loads((out / PARITY_FILE).read_text())["reports"][0]["passed"] is True


def test_norms_dropped_without_base_and_their_cost_measured(tiny_model, tmp_path):
    model = tiny_model("llama")
    delta = _saved_delta(model, tmp_path)
    rep = export_peft_lora(delta, tmp_path / "a")
    assert set(rep["dropped"]) == {f"model.layers.{b}.{n}.weight" for b in (2, 3)
                                   for n in ("input_layernorm", "post_attention_layernorm")}
    assert all("pass --base" in r["reason"] for r in rep["dropped"].values())
    v = verify_peft_lora(model, tmp_path / "a")
    _show("llama, norms dropped", v)
    assert v.passed and v.variant == "approximate"
    assert v["adapter_max_abs_logit_diff"] <= 1e-4  # PEFT reads the files as written
    assert v["dropped_max_abs_logit_diff"] > 1e-3  # the norms' dW=0.01 noise is visible
    # at full rank, the dropped norms are the whole difference
    assert v["max_abs_logit_diff"] == pytest.approx(v["dropped_max_abs_logit_diff"], rel=1e-2)
    # carry=False drops them even with the base
    rep2 = export_peft_lora(delta, tmp_path / "b", base=model, carry=False)
    assert set(rep2["dropped"]) == set(rep["dropped"]) and rep2["config"]["modules_to_save"] is None


def test_biases_carried_and_merge_and_unload_equals_folded(tiny_model, tmp_path):
    from peft import PeftModel

    from lens_merge.models import load_model
    from lens_merge.weights.delta import apply_delta

    model = tiny_model("qwen2")
    delta = _saved_delta(model, tmp_path)
    rep = export_peft_lora(delta, tmp_path / "a", base=model)
    assert rep["config"]["bias"] == "lora_only" and not rep["config"]["lora_bias"]
    assert "model.layers.3.self_attn.q_proj.bias" in rep["carried"]
    with safe_open(str(tmp_path / "a" / ADAPTER_WEIGHTS), "pt") as fh:
        assert "base_model.model.model.layers.3.self_attn.q_proj.base_layer.bias" in fh.keys()
    merged = PeftModel.from_pretrained(load_model(model), str(tmp_path / "a")).merge_and_unload()
    ref = load_model(model)
    apply_delta(ref, LensDelta.load(delta))
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        diff = float((merged(ids).logits - ref(ids).logits).abs().max())
    print(f"qwen2 merge_and_unload vs base + delta: max |dlogit| {diff:.3g}")
    assert diff <= 1e-4


def test_energy_gives_per_tensor_ranks_that_peft_honours(tiny_model, tmp_path):
    model = tiny_model("llama")
    delta = _saved_delta(model, tmp_path)
    rep = export_peft_lora(delta, tmp_path / "a", base=model, energy=0.5)
    ranks = {t["rank"] for t in rep["tensors"].values()}
    assert len(ranks) > 1 and max(ranks) < 64
    cfg = rep["config"]
    assert cfg["rank_pattern"] and cfg["r"] == max(ranks)
    assert all(t["energy"] >= 0.5 for t in rep["tensors"].values())
    v = verify_peft_lora(model, tmp_path / "a")
    _show("llama, energy 0.5", v)
    assert v.passed and v.variant == "approximate"
    assert v["adapter_max_abs_logit_diff"] <= 1e-4
    assert v["max_abs_logit_diff"] > 1e-3 and v["size_ratio"] < 1.0


def test_a_delta_that_is_not_a_layer_product_gets_exact_regex_targets(tiny_model, tmp_path):
    model = tiny_model("llama")
    d = random_delta(model, top_k=2, scale=0.01)
    del d.tensors["model.layers.2.self_attn.q_proj.weight"]
    del d.meta["tensors"]["model.layers.2.self_attn.q_proj.weight"]
    rep = export_peft_lora(d.save(tmp_path / "delta"), tmp_path / "a", base=model)
    cfg = rep["config"]
    assert isinstance(cfg["target_modules"], str) and cfg["layers_to_transform"] is None
    v = verify_peft_lora(model, tmp_path / "a")
    assert v.passed and v["max_abs_logit_diff"] <= 1e-4


def test_folded_checkpoint_as_reference(tiny_model, tmp_path):
    from lens_merge.weights.fold import fold

    model = tiny_model("mistral")
    delta = _saved_delta(model, tmp_path)
    fold(model, delta, tmp_path / "folded")
    export_peft_lora(delta, tmp_path / "a", base=model)
    v = verify_peft_lora(model, tmp_path / "a", tmp_path / "folded", write_report=False)
    assert v.passed and v.variant == "full_rank" and v["max_abs_logit_diff"] <= 1e-4
    assert v.reference == str(tmp_path / "folded") and not (tmp_path / "a" / PARITY_FILE).exists()


def test_other_base_is_refused_by_hash(tiny_model, tmp_path):
    model = tiny_model("llama")
    other = build_random_model(TINY_CONFIGS["llama"], tmp_path / "other", seed=1)
    delta = _saved_delta(model, tmp_path)
    with pytest.raises(AdapterError, match=r"made for another base: tensor model\.layers\.2\..* "
                                           r"has sha256 [0-9a-f]{64}, the delta records"):
        export_peft_lora(delta, tmp_path / "a", base=other)
    export_peft_lora(delta, tmp_path / "a", base=model)
    with pytest.raises(AdapterError, match="made for another base"):
        verify_peft_lora(other, tmp_path / "a")
    with pytest.raises(AdapterError, match="has none"):
        export_peft_lora(delta, tmp_path / "b", base=tiny_model("phi3"))


def test_bad_inputs(tiny_model, tmp_path):
    model = tiny_model("llama")
    delta = _saved_delta(model, tmp_path)
    with pytest.raises(AdapterError, match=r"rank 65 .*down_proj\.weight of shape \[64, 128\]"):
        export_peft_lora(delta, tmp_path / "a", rank=65)
    assert not (tmp_path / "a").exists()
    d = LensDelta.load(delta)
    d.tensors["model.embed_tokens.weight"] = torch.zeros(2048, 64)
    with pytest.raises(AdapterError, match="model.embed_tokens.weight .embeddings / lm_head"):
        export_peft_lora(d, tmp_path / "a")
    export_peft_lora(delta, tmp_path / "a", rank=4)
    with pytest.raises(OutputError, match="exists"):
        export_peft_lora(delta, tmp_path / "a", rank=4)
    with pytest.raises(OutputError, match="inside"):
        export_peft_lora(delta, delta / "adapter")
    export_peft_lora(delta, tmp_path / "a", rank=8, overwrite=True)
    assert json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())["r"] == 8


def test_freeze_norms_trains_an_all_linear_delta_the_adapter_carries_exactly(tiny_model,
                                                                             tmp_path):
    from lens_merge.config import TrainConfig
    from lens_merge.data import load_prompts
    from lens_merge.lens.probe import probe
    from lens_merge.lens.train.loop import train
    from lens_merge.models import load_model, load_tokenizer

    langs = ["en", "zh", "ja"]
    model = tiny_model("qwen2")  # norms and q/k/v biases: every 1-D kind
    sub = probe(load_model(model), load_tokenizer(model),
                {lang: load_prompts("default", langs, split="train", max_samples=8).texts(lang)
                 for lang in langs}, batch_size=4)
    prompts = load_prompts("default", langs, split="train", max_samples=4)
    cfg = TrainConfig(top_k=2, lr=3e-3, epochs=1, batch_size=2, grad_accum=1,
                      warmup_ratio=0.0, max_grad_norm=None, freeze_norms=True)
    res = train(model, sub, prompts, cfg, tmp_path / "work", max_length=48, base_ref=str(model))
    shapes = {n: tuple(t.shape) for n, t in res.delta.tensors.items()}
    print(f"freeze_norms delta: {len(shapes)} tensors, "
          f"{sum(len(s) == 1 for s in shapes.values())} 1-D")
    assert shapes and all(len(s) == 2 for s in shapes.values())
    assert any(float(t.abs().max()) > 0 for t in res.delta.tensors.values())
    assert res.delta.meta["hyperparameters"]["freeze_norms"] is True
    delta = res.delta.save(tmp_path / "delta")
    rep = export_peft_lora(delta, tmp_path / "a")  # no base needed: nothing to carry
    assert rep["dropped"] == {} and rep["carried"] == {}
    v = verify_peft_lora(model, tmp_path / "a")
    _show("qwen2 freeze_norms", v)
    assert v.passed and v.variant == "full_rank" and v["max_abs_logit_diff"] <= 1e-4


def test_a_broken_adapter_fails_its_checks(tiny_model, tmp_path):
    from lens_merge.errors import VerificationError

    model = tiny_model("llama")
    delta = _saved_delta(model, tmp_path)
    out = tmp_path / "a"
    export_peft_lora(delta, out, base=model)
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg | {"lora_alpha": cfg["r"] * 2}))
    with pytest.raises(VerificationError, match=r"full_rank.*max_abs_logit_diff") as exc:
        verify_peft_lora(model, out, raise_on_failure=True)
    print(f"alpha doubled: max |dlogit| {exc.value.report['max_abs_logit_diff']:.3g}")
    # PEFT not reading a module the files hold: the PEFT-vs-files check catches it at any rank
    export_peft_lora(delta, out, base=model, energy=0.5, overwrite=True)
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    cfg["target_modules"] = [t for t in cfg["target_modules"] if t != "q_proj"]
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    v = verify_peft_lora(model, out)
    print(f"q_proj not targeted: PEFT vs files {v['adapter_max_abs_logit_diff']:.3g}")
    assert not v.passed and v.variant == "approximate"
    assert v["adapter_max_abs_logit_diff"] > 1e-3
    # a folder PEFT cannot load at all is an AdapterError naming it
    (out / ADAPTER_CONFIG).write_text(json.dumps(cfg | {"rank_pattern": {}, "r": 64}))
    with pytest.raises(AdapterError, match="PEFT cannot load .*size mismatch"):
        verify_peft_lora(model, out)


def test_cli_export_lora_and_verify(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from lens_merge.cli import app

    model = tiny_model("qwen3")
    delta = _saved_delta(model, tmp_path)
    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["export", "lora", str(delta), "-o", str(out), "--rank", "full",
                                 "--verify", "--language", "en"])
    assert r.exit_code == 0, r.output
    assert "recorded in the delta" in r.output  # the base came from the delta's record
    assert "q_norm" in r.output and "modules_to_save" in r.output
    assert "lora full_rank" in r.output and "verification passed" in r.output
    assert (out / ADAPTER_WEIGHTS).is_file() and (out / PARITY_FILE).is_file()
    r = CliRunner().invoke(app, ["export", "lora", str(delta), "-o", str(out)])
    assert r.exit_code == 1 and "--overwrite" in str(r.exception)
    r = CliRunner().invoke(app, ["export", "lora", str(delta), "-o", str(tmp_path / "e"),
                                 "--energy", "0.8", "--drop-norms"])
    assert r.exit_code == 0, r.output
    assert "DROPPED" in r.output and "x the delta" in r.output
    r = CliRunner().invoke(app, ["export", "lora", str(delta), "-o", str(tmp_path / "x"),
                                 "--rank", "3", "--energy", "0.5"])
    assert r.exit_code == 1 and "not both" in str(r.exception)
