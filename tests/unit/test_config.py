"""Recipes: YAML -> pydantic, unknown keys and bad values named."""

from __future__ import annotations

import pytest

from lens_merge.config import load_recipe
from lens_merge.errors import ConfigError
from tests.conftest import ROOT

RECIPES = ROOT / "recipes"


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_shipped_recipes_validate(name):
    r = load_recipe(RECIPES / name)
    assert r.languages[0] == "en"


def test_default_recipe_values():
    r = load_recipe(RECIPES / "default.yaml")
    assert r.base == "default" and len(r.languages) == 10
    assert r.export.gguf.outtypes == ["f16", "q8_0"] and r.export.onnx.enabled


@pytest.mark.parametrize("body, msg", [
    ("name: x\ntrian: {}\n", "unknown key 'trian'"),
    ("name: x\ntrain: {lr: 1e-4, top_kk: 2}\n", "unknown key 'train.top_kk'"),
    ("name: x\ntrain: {lr: -1}\n", "field 'train.lr'"),
    ("name: x\nlanguages: [zh, en]\n", "field 'languages'"),
    ("name: x\nprobe: {pooling: max}\n", "field 'probe.pooling'"),
    ("name: x\nlanguages: [en, zh]\nprobe: {rank: 2}\n", "probe.rank 2 exceeds L-1 = 1"),
    ("train: {}\n", "field 'name'"),
    ("- a\n", "expected a mapping"),
])
def test_bad_recipes_name_the_key(tmp_path, body, msg):
    p = tmp_path / "r.yaml"
    p.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert msg in str(e.value) and str(p) in str(e.value)


def test_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
