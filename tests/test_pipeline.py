"""`lens-merge run`: every stage on a tiny model, skip-on-rerun, --force, the CLI surface."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lens_merge.config import Recipe
from lens_merge.pipeline import STAGE_NAMES, run_recipe

LANGS = ["en", "zh", "sw"]


def _recipe(tmp_path, base, **over) -> Recipe:
    d = {
        "name": "Tiny-Lens", "base": str(base), "languages": LANGS,
        "output_dir": str(tmp_path / "out"),
        "data": {"max_length": 64, "max_train_samples": 8, "max_probe_samples": 8,
                 "max_eval_samples": 4},
        "train": {"top_k": 2, "lr": 1e-3, "epochs": 1, "batch_size": 4, "grad_accum": 1},
        "eval": {"max_new_tokens": 4},
        "export": {"gguf": {"outtypes": ["f32"], "verify": True}, "onnx": None},
    }
    d.update(over)
    return Recipe.model_validate(d)


def test_run_all_stages_then_skip_then_force(tmp_path, tiny_model):
    pytest.importorskip("llama_cpp")
    r = _recipe(tmp_path, tiny_model("llama"))
    first = run_recipe(r, push=False)
    status = {x.name: x.status for x in first}
    assert status == {"probe": "ran", "train": "ran", "eval": "ran", "fold": "ran",
                      "verify": "ran", "gguf": "ran", "onnx": "disabled", "card": "ran",
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
    assert json.loads((root / "report/fold_verify.json").read_text())["passed"] is True

    again = run_recipe(r, push=False)
    assert [x.status for x in again if x.status != "disabled"] == ["skipped"] * 7

    forced = run_recipe(r, push=False, force=["eval"])
    st = {x.name: x.status for x in forced}
    assert st["probe"] == st["train"] == "skipped"
    assert st["eval"] == "ran"
    # eval rewrote the delta's json (its effect): fold and everything after it run again
    assert st["fold"] == st["verify"] == st["gguf"] == st["card"] == "ran"

    r2 = _recipe(tmp_path, tiny_model("llama"),
                 train={"top_k": 2, "lr": 2e-3, "epochs": 1, "batch_size": 4, "grad_accum": 1})
    changed = {x.name: x.status for x in run_recipe(r2, push=False)}
    assert changed["probe"] == "skipped" and changed["train"] == "ran"
    cache_dir = root / ".work" / "cache"
    assert len(list(cache_dir.glob("*.pt"))) == 1  # the new lr reused the cache


def test_shared_pass_probe_equals_plain_probe(tmp_path, tiny_model):
    import torch

    from lens_merge.probe import Subspace
    from lens_merge.stages import run_probe

    r = _recipe(tmp_path, tiny_model("qwen2"),
                data={"max_length": 64, "max_train_samples": 8, "max_probe_samples": 5})
    shared = run_probe(r, tmp_path / "a", work_dir=tmp_path / "work")
    plain = run_probe(r, tmp_path / "b")
    assert shared.meta["shared_pass"] == sorted(LANGS) and plain.meta["shared_pass"] == []
    assert shared.meta["sample_counts"] == plain.meta["sample_counts"] == dict.fromkeys(LANGS, 5)
    assert len(list((tmp_path / "work" / "cache").glob("*.pt"))) == 1
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
