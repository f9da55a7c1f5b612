"""llama.cpp LoRA adapter GGUF on tiny random models of every GGUF-exportable architecture.

The chain checked per family: base GGUF + adapter in llama.cpp == folded GGUF in llama.cpp
(f32, full rank: exact up to fp32 rounding), and, with gguf's own reader, folded tensor ==
base tensor + B @ A for every pair (so the names and the Q/K permutation of B agree with the
base export). Refusals: norms, embeddings, another base, an architecture GGUF export lacks, a
rank larger than a tensor, a base GGUF of another architecture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lens_merge.errors import AdapterError
from lens_merge.testing import TINY_TOKENIZER_PRE
from tests.conftest import requires_llama, requires_peft

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "phi3"]
META = {"name": "Tiny Test"}  # a "phi3" general.name makes llama.cpp patch Phi-3's tokens


def linear_delta(model_dir: Path, scale: float = 0.02, seed: int = 0):
    """``random_delta`` of the top two blocks without its 1-D tensors (norms, biases)."""
    from lens_merge.testing import random_delta

    d = random_delta(model_dir, top_k=2, scale=scale, seed=seed)
    d.tensors = {k: v for k, v in d.tensors.items() if v.ndim == 2}
    d.meta["tensors"] = {k: v for k, v in d.meta["tensors"].items() if k in d.tensors}
    return d


def _read(path: Path) -> tuple[dict, dict]:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


def _arr(t) -> np.ndarray:
    """A reader tensor as fp32 in PyTorch order ([rows, cols])."""
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    return np.asarray(t.data, dtype=np.float32).reshape(shape)


@pytest.fixture(scope="module")
def chain(tiny_model, tmp_path_factory):
    """Factory: family -> dict(base, delta dir, folded, base/folded f32 GGUF, adapter)."""
    from lens_merge.adapters.gguf_lora import export_gguf_lora
    from lens_merge.export.gguf import export_gguf
    from lens_merge.weights.fold import fold

    made: dict[str, dict] = {}

    def make(family: str) -> dict:
        if family not in made:
            base = tiny_model(family)
            w = tmp_path_factory.mktemp(f"lora-{family}")
            delta = linear_delta(base).save(w / "delta")
            fold(base, delta, w / "folded")
            for name, src in (("base", base), ("folded", w / "folded")):
                export_gguf(src, w / f"{name}.gguf", outtype="f32",
                            tokenizer_pre=TINY_TOKENIZER_PRE, metadata=META)
            rep = export_gguf_lora(delta, base, w / "adapter.gguf")
            made[family] = {"base": base, "delta": delta, "folded": w / "folded", "w": w,
                            "base_gguf": w / "base.gguf", "folded_gguf": w / "folded.gguf",
                            "adapter": w / "adapter.gguf", "rep": rep}
        return made[family]

    return make


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_file_layout_and_tensors_add_up(family, chain):
    c = chain(family)
    rep = c["rep"]
    f, ad = _read(c["adapter"])
    _, base = _read(c["base_gguf"])
    _, folded = _read(c["folded_gguf"])
    assert f["general.type"] == "adapter" and f["adapter.type"] == "lora"
    assert f["general.architecture"] == rep["architecture"]
    assert f["adapter.lora.alpha"] == pytest.approx(rep["max_rank"]) == rep["alpha"]
    assert rep["base_checked"] and rep["n_pairs"] == len(ad) // 2 > 0
    assert not any("norm" in n or "rope" in n for n in ad)
    worst = 0.0
    for name in [n[: -len(".lora_a")] for n in ad if n.endswith(".lora_a")]:
        a, b = _arr(ad[name + ".lora_a"]), _arr(ad[name + ".lora_b"])
        w0, w1 = _arr(base[name]), _arr(folded[name])
        assert a.shape == (b.shape[1], w0.shape[1]) and b.shape[0] == w0.shape[0]
        assert ad[name + ".lora_a"].tensor_type.name == "F32"
        r = a.shape[0]
        got = w0 + f["adapter.lora.alpha"] / r * (b @ a)  # what llama.cpp computes
        worst = max(worst, float(np.abs(got - w1).max() / np.abs(w1 - w0).max()))
    print(f"{family}: {rep['n_pairs']} pairs, worst |base + BA - folded| / |dW| = {worst:.2e}")
    assert worst < 1e-4  # the permutation of B matches the base export's, to fp32 rounding


@requires_llama
@pytest.mark.parametrize("family", FAMILIES)
def test_base_plus_adapter_equals_folded_in_llama_cpp(family, chain):
    from lens_merge.adapters.gguf_lora import verify_gguf_lora

    c = chain(family)
    v = verify_gguf_lora(c["base_gguf"], c["adapter"], c["folded_gguf"],
                         languages=["en", "zh", "ar"], max_new_tokens=12, n_threads=1)
    m = v.metrics
    print(f"{family}: max|dlogit| {m['max_abs_logit_diff']:.2e} top-1 {m['top1_agreement']:.3f} "
          f"greedy {m['generation_match']:.2f}; without adapter: max|dlogit| "
          f"{m['baseline_max_abs_logit_diff']:.3f} top-1 {m['baseline_top1_agreement']:.3f}")
    assert v.passed and v.kind == "gguf_lora" and v.variant == "f32"
    assert m["max_abs_logit_diff"] < 1e-3 and m["top1_agreement"] == 1.0
    assert m["baseline_max_abs_logit_diff"] > 100 * m["max_abs_logit_diff"]  # the edit matters


@requires_llama
def test_unpermuted_b_would_fail(chain, monkeypatch):
    """Without the Q/K permutation of B the same check fails: the test can see it."""
    from lens_merge.adapters import gguf_lora
    from lens_merge.export.gguf import _tensors

    c = chain("llama")
    monkeypatch.setattr(_tensors, "permute_rope", lambda w, n: w)
    out = c["w"] / "unpermuted.gguf"
    gguf_lora.export_gguf_lora(c["delta"], c["base"], out)
    v = gguf_lora.verify_gguf_lora(c["base_gguf"], out, c["folded_gguf"], languages=["en"],
                                   max_new_tokens=4, raise_on_failure=False, n_threads=1)
    print(f"unpermuted: max|dlogit| {v.metrics['max_abs_logit_diff']:.3g}")
    assert not v.passed and v.metrics["max_abs_logit_diff"] > 1e-3


def test_rank_energy_and_f16(chain):
    from lens_merge.adapters.gguf_lora import export_gguf_lora

    c = chain("llama")
    r4 = export_gguf_lora(c["delta"], c["base"], c["w"] / "r4.gguf", rank=4, outtype="f16")
    f, t = _read(c["w"] / "r4.gguf")
    assert {row["rank"] for row in r4["tensors"]} == {4} and f["adapter.lora.alpha"] == 4.0
    assert {x.tensor_type.name for x in t.values()} == {"F16"}
    assert 0.5 < r4["max_rel_error"] < 1.0 and r4["size_ratio"] < 0.1
    e = export_gguf_lora(c["delta"], c["base"], c["w"] / "e.gguf", energy=0.5)
    assert 1 <= min(r["rank"] for r in e["tensors"]) < e["max_rank"] < 64
    with pytest.raises(AdapterError, match=r"rank 65 is larger than tensor .* \(at most 64\)"):
        export_gguf_lora(c["delta"], c["base"], c["w"] / "x.gguf", rank=65)
    with pytest.raises(AdapterError, match="exists"):
        export_gguf_lora(c["delta"], c["base"], c["w"] / "r4.gguf", rank=4)


def test_refusals(chain, tiny_model, tiny_tokenizer_dir, tmp_path):
    from lens_merge.adapters.gguf_lora import export_gguf_lora
    from lens_merge.testing import TINY_CONFIGS, build_random_model, random_delta

    c = chain("llama")
    with_norms = random_delta(c["base"], top_k=1, scale=0.01)
    with pytest.raises(AdapterError, match=r"not linear weights .*layernorm.*freeze_norms"):
        export_gguf_lora(with_norms, c["base"], tmp_path / "n.gguf")
    bias = random_delta(tiny_model("qwen2"), top_k=1)
    bias.tensors = {k: v for k, v in bias.tensors.items() if k.endswith(("proj.bias",
                                                                         "q_proj.weight"))}
    with pytest.raises(AdapterError, match=r"not linear weights .*bias"):
        export_gguf_lora(bias, tiny_model("qwen2"), tmp_path / "b.gguf")
    emb = linear_delta(tiny_model("qwen2"))
    emb.tensors["model.embed_tokens.weight"] = np.zeros(1)  # refused before any use
    with pytest.raises(AdapterError, match=r"model.embed_tokens.weight \(embeddings / lm_head\)"):
        export_gguf_lora(emb, tiny_model("qwen2"), tmp_path / "e.gguf")
    other = build_random_model(TINY_CONFIGS["llama"], tmp_path / "other", seed=1,
                               tokenizer_from=tiny_tokenizer_dir)  # same shapes, other weights
    with pytest.raises(AdapterError, match=r"made for another base: tensor .* sha256"):
        export_gguf_lora(c["delta"], other, tmp_path / "o.gguf")
    gemma = tiny_model("gemma2")
    with pytest.raises(AdapterError, match=r"'gemma2' cannot be exported to GGUF; supported: "
                                           r"llama, mistral, phi3, qwen2, qwen3.*LoRA"):
        export_gguf_lora(linear_delta(gemma), gemma, tmp_path / "g.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_adapter_on_another_model_is_refused_before_llama_cpp(chain, tmp_path):
    """llama.cpp refuses these too, but llama-cpp-python 0.3.36 then crashes (segfault)."""
    from lens_merge.adapters._lora_check import check_adapter_fits
    from lens_merge.adapters.gguf_lora import verify_gguf_lora
    from lens_merge.export.gguf import export_gguf
    from lens_merge.testing import TINY_CONFIGS, build_random_model

    llama, qwen = chain("llama"), chain("qwen2")
    with pytest.raises(AdapterError, match="is a llama adapter, .* a qwen2 model"):
        verify_gguf_lora(qwen["base_gguf"], llama["adapter"], qwen["folded_gguf"],
                         languages=["en"], max_new_tokens=2)
    assert check_adapter_fits(llama["base_gguf"], llama["adapter"]) == llama["rep"]["n_pairs"]
    wide = {**TINY_CONFIGS["llama"], "intermediate_size": 96}  # same names, other shapes
    other = build_random_model(wide, tmp_path / "wide", tokenizer_from=llama["base"])
    export_gguf(other, tmp_path / "wide.gguf", outtype="f32", tokenizer_pre=TINY_TOKENIZER_PRE,
                metadata=META)
    with pytest.raises(AdapterError, match=r"ffn_down.weight pair .* does not fit"):
        check_adapter_fits(tmp_path / "wide.gguf", llama["adapter"])
    with pytest.raises(AdapterError, match="not a LoRA adapter"):
        check_adapter_fits(llama["base_gguf"], llama["base_gguf"])


@requires_peft
def test_from_peft_folder_matches_from_delta(chain):
    from lens_merge.adapters.gguf_lora import export_gguf_lora
    from lens_merge.adapters.peft_lora import export_peft_lora

    c = chain("qwen3")
    export_peft_lora(c["delta"], c["w"] / "peft", base=c["base"], energy=0.8)
    rep = export_gguf_lora(c["w"] / "peft", c["base"], c["w"] / "from-peft.gguf")
    direct = export_gguf_lora(c["delta"], c["base"], c["w"] / "direct.gguf", energy=0.8)
    assert rep["source"] == "peft-lora" and rep["base_checked"]
    _, a = _read(c["w"] / "from-peft.gguf")
    fd, b = _read(c["w"] / "direct.gguf")
    assert set(a) == set(b)
    for name in [n[: -len(".lora_a")] for n in a if n.endswith(".lora_a")]:
        pa = _arr(a[name + ".lora_b"]) @ _arr(a[name + ".lora_a"]) * rep["alpha"]
        pb = _arr(b[name + ".lora_b"]) @ _arr(b[name + ".lora_a"]) * direct["alpha"]
        pa, pb = pa / _arr(a[name + ".lora_a"]).shape[0], pb / _arr(b[name + ".lora_a"]).shape[0]
        assert np.abs(pa - pb).max() < 1e-6
    with pytest.raises(AdapterError, match="ranks are fixed"):
        export_gguf_lora(c["w"] / "peft", c["base"], c["w"] / "x.gguf", rank=2)


@requires_llama
def test_cli_export_and_verify(chain, tmp_path):
    import json

    from typer.testing import CliRunner

    from lens_merge.cli import app

    c = chain("qwen2")
    out = tmp_path / "cli.gguf"
    r = CliRunner().invoke(app, ["export", "gguf-lora", str(c["delta"]), "--base",
                                 str(c["base"]), "-o", str(out), "--verify", "--base-gguf",
                                 str(c["base_gguf"]), "--folded-gguf", str(c["folded_gguf"]),
                                 "--language", "en", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "blk.3.attn_q.weight" in r.output and "verification passed" in r.output
    saved = json.loads((tmp_path / "cli.parity.json").read_text())
    assert saved["reports"][0]["kind"] == "gguf_lora" and saved["reports"][0]["passed"]
    r = CliRunner().invoke(app, ["export", "gguf-lora", str(c["delta"]), "--base",
                                 str(c["base"]), "-o", str(out), "--verify"])
    assert r.exit_code != 0 and "--base-gguf" in r.output
