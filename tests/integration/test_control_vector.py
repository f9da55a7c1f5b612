"""Language control vectors on tiny random models of every GGUF-exportable architecture.

Pinned here: llama.cpp adds ``direction.N`` to the output of block N (0-based; it keeps no
vector for block 0), and the probe's layer k is the output of block k, so a probe layer is
written under its own index. Checked against transformers with a forward hook on one block.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lens_merge.errors import AdapterError
from lens_merge.testing import TINY_TOKENIZER_PRE
from tests.conftest import requires_llama

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "phi3"]
LANGS = ["en", "zh", "es"]


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """Factory: family -> dict(model dir, f32 GGUF, probe subspace dir)."""
    from lens_merge.data import load_prompts
    from lens_merge.export.gguf import export_gguf
    from lens_merge.lens.probe import probe
    from lens_merge.models import load_model, load_tokenizer

    made: dict[str, dict] = {}

    def make(family: str) -> dict:
        if family not in made:
            src = tiny_model(family)
            w = tmp_path_factory.mktemp(f"cv-{family}")
            export_gguf(src, w / "model.gguf", outtype="f32", tokenizer_pre=TINY_TOKENIZER_PRE,
                        metadata={"name": "Tiny Test"})
            ps = load_prompts("default", LANGS, split="train", max_samples=6)
            sub = probe(load_model(src), load_tokenizer(src), {x: ps.texts(x) for x in LANGS},
                        meta={"model": {"ref": str(src), "path": str(src)}})
            sub.save(w / "sub")
            made[family] = {"src": src, "gguf": w / "model.gguf", "sub": w / "sub", "w": w,
                            "subspace": sub}
        return made[family]

    return make


def _one_hot_subspace(sub, layer: int, out: Path) -> Path:
    """A copy of ``sub`` whose 'zh' direction is one-hot (2.0 on dim 3) at ``layer`` only."""
    import copy

    import torch

    s = copy.deepcopy(sub)
    i = s.languages.index("zh")
    for k, ly in enumerate(s.layers):
        ly.deltas = ly.deltas.clone()
        ly.deltas[i] = torch.zeros_like(ly.deltas[i])
        if k == layer:
            ly.deltas[i][3] = 2.0
    return s.save(out)


@requires_llama
@pytest.mark.parametrize("family", FAMILIES)
def test_layer_numbering_one_hot(family, setup):
    """direction.N moves exactly what a hook on block N's output moves, nothing else."""
    from lens_merge.adapters import _llama
    from lens_merge.adapters._cv_check import hooked
    from lens_merge.adapters.control_vector import export_control_vector, read_control_vector
    from lens_merge.models import load_model

    c = setup(family)
    model = load_model(c["src"])
    ids = [1, 100, 200, 300, 400, 500]
    llm = _llama.open_llama(c["gguf"], 64, n_threads=1)
    try:
        plain = _llama.scores(llm, ids)
        for n in (1, 2):  # the tiny models have blocks 0..3; layers 1..n-2 are writable
            sub = _one_hot_subspace(c["subspace"], n, c["w"] / f"hot{n}")
            export_control_vector(sub, c["w"] / f"hot{n}.gguf", "zh", layers=f"{n}-{n}")
            cv = read_control_vector(c["w"] / f"hot{n}.gguf")
            assert list(cv.directions) == [n] and cv.directions[n][3] == 2.0
            _llama.set_control_vector(llm, cv.directions, 4)
            got = _llama.scores(llm, ids)
            diffs = []
            for k in range(4):
                with hooked(model, {k: cv.directions[n]}):
                    import torch

                    with torch.inference_mode():
                        ref = model(torch.tensor([ids])).logits[0].numpy()
                diffs.append(float(np.abs(got - ref).max()))
            print(f"{family} direction.{n}: moved {np.abs(got - plain).max():.3f}; llama.cpp vs "
                  f"hook on block k: {[f'{d:.1e}' for d in diffs]}")
            assert np.abs(got - plain).max() > 0.1
            assert diffs[n] < 5e-3 and all(d > 20 * diffs[n] for k, d in enumerate(diffs)
                                           if k != n)
    finally:
        llm.close()


def test_probe_layer_k_is_block_k_output(setup):
    """The subspace's layer k mean is the mean last-position output of block k (k < n-1)."""
    import torch

    from lens_merge.data import load_prompts
    from lens_merge.lens.hidden import encode
    from lens_merge.models import load_model, load_tokenizer

    c = setup("llama")
    model, tok = load_model(c["src"]), load_tokenizer(c["src"])
    texts = load_prompts("default", ["zh"], split="train", max_samples=6).texts("zh")
    outs: dict[int, torch.Tensor] = {}
    hooks = [model.model.layers[k].register_forward_hook(
        lambda m, i, o, k=k: outs.__setitem__(k, (o[0] if isinstance(o, tuple) else o)[:, -1]))
        for k in range(4)]
    enc = encode(tok, texts, 128)
    with torch.inference_mode():
        model(**enc)
    for h in hooks:
        h.remove()
    sub = c["subspace"]
    for k in range(3):
        assert torch.allclose(outs[k].mean(0), sub.layers[k].means[1], atol=1e-4)


def test_export_reads_back(setup):
    from gguf import GGUFReader

    from lens_merge.adapters.control_vector import export_control_vector

    c = setup("qwen2")
    out = c["w"] / "zh.gguf"
    rep = export_control_vector(c["sub"], out, "zh", layers="1-2", scale=0.5)
    r = GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "controlvector"
    assert f["controlvector.model_hint"] == "qwen2" == rep["model_hint"]
    assert f["controlvector.layer_count"] == 2 == rep["layer_count"]
    assert {t.name for t in r.tensors} == {"direction.1", "direction.2"}
    for t in r.tensors:
        k = int(t.name.split(".")[1])
        assert t.tensor_type.name == "F32" and list(t.shape) == [64]
        want = 0.5 * c["subspace"].delta_of("zh", k).numpy()
        np.testing.assert_allclose(np.asarray(t.data), want, rtol=1e-6, atol=1e-8)
    assert rep["layers"] == [1, 2] and rep["norms"]["1"] > 0


def test_bad_input(setup):
    from lens_merge.adapters.control_vector import export_control_vector

    c = setup("llama")
    out = c["w"] / "bad.gguf"
    with pytest.raises(AdapterError, match=r"'ja' is not in the subspace; it has en, zh, es"):
        export_control_vector(c["sub"], out, "ja")
    with pytest.raises(AdapterError, match="reference language: its direction is zero"):
        export_control_vector(c["sub"], out, "en")
    with pytest.raises(AdapterError, match="no control vector to layer 0"):
        export_control_vector(c["sub"], out, "zh", layers="0-2")
    with pytest.raises(AdapterError, match="after the final norm"):
        export_control_vector(c["sub"], out, "zh", layers="1-3")
    with pytest.raises(AdapterError, match="expected A-B"):
        export_control_vector(c["sub"], out, "zh", layers="one-two")
    with pytest.raises(AdapterError, match="after the last"):
        export_control_vector(c["sub"], out, "zh", layers="2-1")
    assert not out.exists()


@requires_llama
@pytest.mark.parametrize("family", FAMILIES)
def test_verify_against_hooks(family, setup):
    from lens_merge.adapters.control_vector import export_control_vector, verify_control_vector

    c = setup(family)
    out = c["w"] / "zh-verify.gguf"
    export_control_vector(c["sub"], out, "zh", scale=8.0, overwrite=True)
    v = verify_control_vector(c["src"], c["gguf"], out, languages=["en", "zh"],
                              max_new_tokens=8, n_threads=1)
    m = v.metrics
    print(f"{family}: max|dlogit| {m['max_abs_logit_diff']:.2e} top-1 {m['top1_agreement']:.3f}"
          f" greedy {m['generation_match']:.2f}; the vector moved logits by "
          f"{m['vector_logit_shift']:.3f}")
    assert v.passed and v.kind == "control_vector" and v.variant == "f32"
    assert m["top1_agreement"] >= 0.99 and m["max_abs_logit_diff"] < 5e-3
    assert m["vector_logit_shift"] > 20 * m["max_abs_logit_diff"]


@requires_llama
def test_effect_report(setup):
    from lens_merge.adapters.control_vector import control_vector_effect, export_control_vector

    c = setup("llama")
    cv = c["w"] / "zh-effect.gguf"
    export_control_vector(c["sub"], cv, "zh", overwrite=True)
    js = c["w"] / "effect.json"
    res = control_vector_effect(c["gguf"], cv, scales=(1.0, 50.0), n_prompts=3,
                                max_new_tokens=6, out=js, checkpoint=c["src"], n_threads=1)
    saved = json.loads(js.read_text())
    assert saved["language"] == "zh" == res["language"] and saved["n_prompts"] == 3
    assert [r["scale"] for r in saved["rows"]] == [0.0, 1.0, 50.0]
    assert all(0.0 <= r["share_in_language"] <= 1.0 for r in saved["rows"])
    assert saved["rows"][0]["examples"] != saved["rows"][2]["examples"]  # the vector acts


@requires_llama
def test_effects_of_several_vectors_equal_each_alone(setup):
    """One load for several vectors: the unsteered replies are made once and every language's
    table equals the one its vector gets alone."""
    from lens_merge.adapters.control_vector import (
        control_vector_effect,
        control_vector_effects,
        export_control_vector,
    )

    c = setup("llama")
    paths = {lang: c["w"] / f"{lang}-many.gguf" for lang in ("zh", "es")}
    for lang, path in paths.items():
        export_control_vector(c["sub"], path, lang, overwrite=True)
    kw = {"scales": (1.0, 50.0), "n_prompts": 3, "max_new_tokens": 6, "checkpoint": c["src"],
          "n_threads": 1}
    many = control_vector_effects(c["gguf"], paths, **kw)
    assert list(many) == ["zh", "es"]
    for lang, path in paths.items():
        alone = control_vector_effect(c["gguf"], path, **kw)
        assert many[lang]["rows"] == alone["rows"]
        assert many[lang]["language"] == lang and many[lang]["control_vector"] == str(path)
    assert many["zh"]["rows"][0] == {**many["es"]["rows"][0], "share_in_language":
                                     many["zh"]["rows"][0]["share_in_language"]}


@requires_llama
def test_cli_export_verify_effect(setup, tmp_path):
    from typer.testing import CliRunner

    from lens_merge.cli import app

    c = setup("qwen3")
    out = tmp_path / "cli.gguf"
    r = CliRunner().invoke(app, ["export", "control-vector", str(c["sub"]), "-o", str(out),
                                 "--language", "es", "--layers", "1-2", "--scale", "4",
                                 "--verify", "--checkpoint", str(c["src"]), "--gguf",
                                 str(c["gguf"]), "--effect-scales", "1,2", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "verification passed" in r.output and "replies in es" in r.output
    parity = json.loads((tmp_path / "cli.parity.json").read_text())["reports"][0]
    effect = json.loads((tmp_path / "cli.effect.json").read_text())
    assert parity["kind"] == "control_vector" and parity["passed"]
    assert [row["scale"] for row in effect["rows"]] == [0.0, 1.0, 2.0]
    r = CliRunner().invoke(app, ["export", "control-vector", str(c["sub"]), "-o",
                                 str(tmp_path / "x.gguf"), "--language", "ko"])
    assert r.exit_code != 0 and "'ko' is not in the subspace" in str(r.exception)
