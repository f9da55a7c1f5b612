"""`lens-merge run`: every stage on a tiny model, skip-on-rerun, --force, the CLI surface."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lens_merge.config import Recipe
from lens_merge.release.pipeline import STAGE_NAMES, run_recipe
from lens_merge.testing import TINY_TOKENIZER_PRE
from tests.conftest import requires_llama

LANGS = ["en", "zh", "sw"]


def _recipe(tmp_path, base, **over) -> Recipe:
    d = {
        "name": "Tiny-Lens", "base": str(base), "languages": LANGS,
        "output_dir": str(tmp_path / "out"),
        "data": {"max_length": 64, "max_train_samples": 8, "max_probe_samples": 8,
                 "max_eval_samples": 4},
        "train": {"top_k": 2, "lr": 1e-3, "epochs": 1, "batch_size": 4, "grad_accum": 1},
        "eval": {"max_new_tokens": 4},
        "export": {"gguf": {"outtypes": ["f32"], "verify": True,
                            "tokenizer_pre": TINY_TOKENIZER_PRE}, "onnx": None},
    }
    d.update(over)
    return Recipe.model_validate(d)


@requires_llama
def test_run_all_stages_then_skip_then_force(tmp_path, tiny_model):
    r = _recipe(tmp_path, tiny_model("llama"))
    first = run_recipe(r, push=False)
    status = {x.name: x.status for x in first}
    assert status == {"probe": "ran", "train": "ran", "eval": "ran", "bench": "disabled",
                      "fold": "ran",
                      "verify": "ran", "gguf": "ran", "onnx": "disabled", "adapters": "disabled",
                      "card": "ran",
                      "push": "disabled"}
    root = r.release_dir
    for rel in ("README.md", "recipe.yaml", "delta/lens_delta.json", "model/config.json",
                "model/lens_merge.json", "gguf/Tiny-Lens-F32.gguf", "report/lens_report.json",
                "report/train_log.jsonl", "report/fold_verify.json", "report/gguf_verify.json",
                "report/subspace/subspace.json", "report/run.json"):
        assert (root / rel).is_file(), rel
    # probe and cache shared one forward pass: the train stage found the cache built
    assert {x.name: x.numbers for x in first}["train"]["cache"] == "reused"
    sub_meta = json.loads((root / "report/subspace/subspace.json").read_text())
    assert sub_meta["shared_pass"] == sorted(LANGS)
    delta_meta = json.loads((root / "delta/lens_delta.json").read_text())
    assert delta_meta["effect"]["summary"]["english_kl"] >= 0
    from lens_merge.records import ParitySet, read_record

    fold_set = read_record(root / "report/fold_verify.json", ParitySet)
    assert fold_set.passed and fold_set.reports[0].kind == "fold"
    assert fold_set.reports[0].metrics["max_abs_logit_diff"] <= 1e-4
    gguf_set = read_record(root / "report/gguf_verify.json", ParitySet)
    assert [r.variant for r in gguf_set.reports] == ["f32"] and gguf_set.passed
    # transformers' side of the checks, kept by the folded model's hash for the ONNX check
    kept = list((root / ".work/reference").glob("*/*.safetensors"))
    assert len(kept) == gguf_set.reports[0].n_prompts == len(LANGS)
    # the manifest lists what the stages wrote, and nothing else
    import lens_merge.release.manifest as manifest
    from lens_merge.records import ReleaseLayout

    listed = manifest.load(ReleaseLayout(root=root)).files
    assert {"README.md", "recipe.yaml", "delta/lens_delta.json", "model/config.json",
            "gguf/Tiny-Lens-F32.gguf", "report/fold_verify.json"} <= set(listed)
    assert not any(k.startswith((".work", ".lens_merge")) for k in listed)

    again = run_recipe(r, push=False)
    assert [x.status for x in again if x.status != "disabled"] == ["skipped"] * 7

    forced = run_recipe(r, push=False, force=["eval"])
    st = {x.name: x.status for x in forced}
    assert st["probe"] == st["train"] == "skipped"
    assert st["eval"] == "ran"
    # eval wrote the same bytes again (no timestamps in artifacts): stages downstream see the
    # same input hashes and are skipped
    assert st["fold"] == st["verify"] == st["gguf"] == st["card"] == "skipped", st

    r2 = _recipe(tmp_path, tiny_model("llama"),
                 train={"top_k": 2, "lr": 2e-3, "epochs": 1, "batch_size": 4, "grad_accum": 1})
    changed = {x.name: x.status for x in run_recipe(r2, push=False)}
    assert changed["probe"] == "skipped" and changed["train"] == "ran"
    assert changed["eval"] == changed["fold"] == changed["gguf"] == changed["card"] == "ran"
    cache_dir = root / ".work" / "cache"
    assert len(list(cache_dir.glob("*/cache.json"))) == 1  # the new lr reused the cache
    assert [p.name for p in cache_dir.iterdir()] == [p.parent.name
                                                     for p in cache_dir.glob("*/cache.json")]


def test_shared_pass_probe_equals_plain_probe(tmp_path, tiny_model):
    import torch

    from lens_merge.lens.probe import Subspace
    from lens_merge.lens.run import run_probe

    r = _recipe(tmp_path, tiny_model("qwen2"),
                data={"max_length": 64, "max_train_samples": 8, "max_probe_samples": 5})
    shared = run_probe(r, tmp_path / "a", work_dir=tmp_path / "work")
    plain = run_probe(r, tmp_path / "b")
    assert shared.meta["shared_pass"] == sorted(LANGS) and plain.meta["shared_pass"] == []
    assert shared.meta["sample_counts"] == plain.meta["sample_counts"] == dict.fromkeys(LANGS, 5)
    assert len(list((tmp_path / "work" / "cache").glob("*/cache.json"))) == 1
    for a, b in zip(Subspace.load(tmp_path / "a").layers, plain.layers, strict=True):
        torch.testing.assert_close(a.means, b.means, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.deltas, b.deltas, atol=1e-4, rtol=1e-4)
    # a second probe finds the cache in place and runs its own pass
    again = run_probe(r, tmp_path / "c", work_dir=tmp_path / "work")
    assert again.meta["shared_pass"] == []


def test_unknown_stage_is_named(tmp_path, tiny_model):
    from lens_merge.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown stage 'trian'; stages: probe, train"):
        run_recipe(_recipe(tmp_path, tiny_model("llama")), force=["trian"])
    assert STAGE_NAMES[0] == "probe"


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "lens_merge.cli", *args], capture_output=True,
                          text=True, timeout=300, **kw)


def test_cli_version_and_help_are_light():
    from lens_merge import __version__

    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"lens-merge {__version__}"
    code = ("import sys, lens_merge.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'onnx', 'llama_cpp', 'gguf') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
    r = _cli("--help")
    for cmd in ("run", "probe", "train", "eval", "fold", "unfold", "verify", "export", "card",
                "push"):
        assert cmd in r.stdout


def test_cli_bad_recipe_is_one_clean_error(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\ntrain: {lr: 1e-4, epoch: 2}\n")
    r = _cli("run", str(p))
    assert r.returncode == 1
    assert "unknown key 'train.epoch'" in r.stderr and "Traceback" not in r.stderr


def test_failed_run_keeps_recipe_and_clears_stale_temps(tmp_path, tiny_model):
    """A run that fails leaves the last good release's recipe.yaml; temporaries a killed run
    left in the release folder are removed by the next run, and an output moved aside and
    never replaced is put back."""
    from lens_merge.errors import LensMergeError
    from lens_merge.files import temp_sibling

    r = _recipe(tmp_path, tiny_model("llama"))
    root = r.release_dir
    (root / "report").mkdir(parents=True)
    (root / "recipe.yaml").write_text("name: the-last-good-one\n")
    stale_dir = temp_sibling(root / "model")
    stale_dir.mkdir()
    (stale_dir / "model-00001-of-00002.safetensors").write_bytes(b"half written")
    stale_file = temp_sibling(root / "report" / "run.json")
    stale_file.write_text("{")
    moved_aside = temp_sibling(root / "delta", "old")
    moved_aside.mkdir()
    (moved_aside / "lens_delta.json").write_text("{}")
    broken = _recipe(tmp_path, tmp_path / "no-such-model")
    with pytest.raises(LensMergeError):
        run_recipe(broken, push=False)
    assert (root / "recipe.yaml").read_text() == "name: the-last-good-one\n"
    assert not stale_dir.exists() and not stale_file.exists()
    assert (root / "delta" / "lens_delta.json").read_text() == "{}"  # put back, not deleted
    run = json.loads((root / "report" / "run.json").read_text())
    assert [s["status"] for s in run["stages"]] == ["failed"]


@requires_llama
def test_run_exports_adapters_into_the_release(tmp_path, tiny_model):
    """export.lora, export.gguf_lora and export.control_vectors: adapters/ in the release, their
    checks in report/adapters_verify.json, a usage block each in the card, all in the manifest."""
    pytest.importorskip("peft", reason="needs peft: pip install '.[lora]'")
    import lens_merge.release.manifest as manifest
    from lens_merge.records import ParitySet, ReleaseLayout, read_json, read_record

    r = _recipe(tmp_path, tiny_model("llama"),
                train={"top_k": 2, "lr": 1e-3, "epochs": 1, "batch_size": 4, "grad_accum": 1,
                       "freeze_norms": True},
                export={"gguf": {"outtypes": ["f32"], "verify": False,
                                 "tokenizer_pre": TINY_TOKENIZER_PRE},
                        "onnx": None, "lora": {}, "gguf_lora": {"outtype": "f32"},
                        "control_vectors": {"languages": ["zh"], "effect_scales": [0.1, 0.5],
                                            "effect_prompts": 2}})
    status = {x.name: x.status for x in run_recipe(r, push=False)}
    assert status["adapters"] == "ran"
    root = r.release_dir
    ad = root / "adapters"
    assert (ad / "peft" / "adapter_config.json").is_file()
    assert (ad / "Tiny-Lens-LoRA-F32.gguf").is_file() and (ad / "Tiny-Lens-cv-zh.gguf").is_file()
    checks = read_record(root / "report/adapters_verify.json", ParitySet)
    assert checks.passed and {r.kind for r in checks.reports} == {"lora", "gguf_lora",
                                                                  "control_vector"}
    cv_rep = next(x for x in checks.reports if x.kind == "control_vector")
    assert cv_rep.metrics["top1_agreement"] >= 0.99 and cv_rep.languages == ["en", "zh"]
    effect = read_json(root / "report/control_vector_effect.json")
    assert [r["scale"] for r in effect["languages"]["zh"]["rows"]] == [0.0, 0.1, 0.5]
    assert effect["languages"]["zh"]["n_prompts"] == 2
    peft_rep = next(x for x in checks.reports if x.kind == "lora")
    assert peft_rep.metrics["max_abs_logit_diff"] <= 1e-4  # full rank, all-linear delta
    card = (root / "README.md").read_text()
    assert 'subfolder="adapters/peft"' in card
    assert "--lora adapters/Tiny-Lens-LoRA-F32.gguf" in card
    assert "--control-vector-scaled adapters/Tiny-Lens-cv-zh.gguf" in card
    assert "| language | 0 | 0.1 | 0.5 |" in card and "\n| zh | " in card
    listed = manifest.load(ReleaseLayout(root=root)).files
    assert "adapters/Tiny-Lens-LoRA-F32.gguf" in listed and "report/adapters_verify.json" in listed
