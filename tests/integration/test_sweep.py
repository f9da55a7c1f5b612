"""`lens-merge sweep`: a 2x2 grid on a tiny model shares one training cache, writes the table,
JSON and Pareto plot, resumes (finished points reused, unfinished redone), and refuses a bad
grid key before any work. Plus the pure parts: grid parsing, report metrics, the front."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from lens_merge.config import EvalConfig, Recipe
from lens_merge.errors import ConfigError
from lens_merge.sweep import expand_grid, parse_grid, update_readme
from lens_merge.sweep.metrics import pareto_front, report_metrics
from lens_merge.sweep.record import SweepRecord

LANGS = ["en", "zh", "sw"]
GRID = ["train.lr=1e-4,3e-3", "train.lambda_separate=0.5,2"]


def _raw(tmp_path, base) -> dict:
    return {
        "name": "Tiny-Sweep", "base": str(base), "languages": LANGS,
        "output_dir": str(tmp_path / "out"),
        "data": {"max_length": 48, "max_train_samples": 8, "max_probe_samples": 8,
                 "max_eval_samples": 3},
        "train": {"top_k": 2, "lr": 1e-3, "epochs": 1, "batch_size": 4, "grad_accum": 1},
        "eval": {"max_new_tokens": 2},
    }


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lens_merge.cli", *args], capture_output=True,
                          text=True, timeout=600)


def test_sweep_one_cache_outputs_resume(tmp_path, tiny_model):
    base = tiny_model("llama")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_raw(tmp_path, base)))
    out = tmp_path / "sweep"
    readme = tmp_path / "README.md"
    readme.write_text("# T\n\nbefore\n<!-- sweep:begin -->\nold table\n<!-- sweep:end -->\nafter\n")
    grid_args = [a for g in GRID for a in ("--grid", g)]
    r = _cli("sweep", str(recipe), *grid_args, "--out", str(out), "--readme", str(readme))
    assert r.returncode == 0, r.stderr[-3000:]
    # one cache build, in the probe's shared pass; every point reused it
    assert r.stdout.count("training cache built") == 1, r.stdout
    assert r.stdout.count(": ran, cache reused") == 4, r.stdout
    assert len(list((out / "work" / "cache").glob("*/cache.json"))) == 1
    rec = SweepRecord.model_validate_json((out / "sweep.json").read_text())
    assert rec.cache_builds == 1 and rec.probe.cache_built and rec.grid_points == 4
    assert [p.overrides for p in rec.points] == [
        {"train.lr": 1e-4, "train.lambda_separate": 0.5},
        {"train.lr": 1e-4, "train.lambda_separate": 2.0},
        {"train.lr": 3e-3, "train.lambda_separate": 0.5},
        {"train.lr": 3e-3, "train.lambda_separate": 2.0}]
    assert [p.cache for p in rec.points] == ["reused"] * 4
    assert len({p.key for p in rec.points}) == 4
    for p in rec.points:
        assert p.steps == 2 and p.metrics.english_kl is not None and p.metrics.english_kl >= 0
        assert p.metrics.target_gain is not None and p.metrics.languages_total == 2
        assert 0 <= p.metrics.english_top1 <= 1
        report = json.loads((out / "points" / p.key[:16] / "report" / "lens_report.json")
                            .read_text())
        assert report["summary"]["english_kl"] == p.metrics.english_kl
        if "steering" in EvalConfig.model_fields:  # the sweep evaluates with steering off
            assert "steering" not in report["summary"]
            assert "steer" not in (report["summary"].get("lpr") or {})
    # a larger lr moves English further from the base (same data, same cache)
    kl = [p.metrics.english_kl for p in rec.points]
    assert kl[2] > kl[0] and kl[3] > kl[1], kl
    assert any(p.pareto for p in rec.points)
    md = (out / "sweep.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| #")]
    assert len(rows) == 4 and "| train.lr | train.lambda_separate |" in md
    assert rows[2].startswith("| 3 | 0.003 | 0.5 | ")
    assert (out / "sweep_pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# T\n\nbefore\n<!-- sweep:begin -->\n")
    assert text.endswith("<!-- sweep:end -->\nafter\n") and text.count("| 3 | 0.003 |") == 1
    log = [json.loads(x) for x in (out / "sweep_log.jsonl").read_text().splitlines()]
    assert [e["cache"] for e in log] == ["built"] + ["reused"] * 4

    # rerun: the probe and every point reused, nothing trained
    from lens_merge.config import load_recipe
    from lens_merge.sweep.runner import run_sweep

    events = []
    again = run_sweep(load_recipe(recipe), parse_grid(GRID), out, on_event=events.append)
    assert [(e.kind, e.status) for e in events] == [("probe", "reused")] + [("point", "reused")] * 4
    assert [p.metrics for p in again.record.points] == [p.metrics for p in rec.points]
    assert again.record.cache_builds == 1

    # a killed point (no point.json, a half-written file) is removed and redone
    victim = out / "points" / rec.points[1].key[:16]
    (victim / "point.json").unlink()
    (victim / "half-written.tmp").write_text("x")
    events.clear()
    third = run_sweep(load_recipe(recipe), parse_grid(GRID), out, on_event=events.append)
    assert [e.status for e in events] == ["reused", "reused", "ran", "reused", "reused"]
    assert events[2].cache == "reused" and not (victim / "half-written.tmp").exists()
    assert (victim / "point.json").is_file()
    redone = third.record.points[1]
    assert redone.final_losses == pytest.approx(rec.points[1].final_losses, rel=1e-5)
    assert third.record.cache_builds == 1
    assert len(list((out / "work" / "cache").glob("*/cache.json"))) == 1

    # a changed recipe value outside the grid invalidates every point (new keys)
    changed = load_recipe(recipe).model_copy(deep=True)
    changed.train.weight_decay = 0.0
    keys = {p.key for p in rec.points}
    from lens_merge.sweep.runner import _Fingerprints, point_key

    fp = _Fingerprints()
    new = {point_key(p.recipe, fp, rec.probe.subspace_sha256)
           for p in expand_grid(changed, parse_grid(GRID))}
    assert not new & keys


def test_bad_grid_key_fails_before_any_work(tmp_path, tiny_model):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_raw(tmp_path, tiny_model("llama"))))
    out = tmp_path / "sweep"
    for grid, expected in [("train.lrr=1e-4,1e-3", "train.lrr"),
                           ("train.lr=1e-4,abc", "--grid train.lr=abc"),
                           ("probe.rank=1,2", "--grid probe.rank: not a sweep key"),
                           ("train=1,2", "train")]:
        r = _cli("sweep", str(recipe), "--grid", grid, "--out", str(out))
        assert r.returncode == 1, (grid, r.stderr)
        assert expected in r.stderr and "Traceback" not in r.stderr, (grid, r.stderr)
        assert not out.exists()
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    r = _cli("sweep", str(recipe), "--grid", GRID[0], "--out", str(out), "--readme", str(readme))
    assert r.returncode == 1 and "<!-- sweep:begin -->" in r.stderr and not out.exists()


def test_parse_and_expand_grid(tmp_path):
    r = Recipe.model_validate(_raw(tmp_path, tmp_path))
    grid = parse_grid(["train.top_k=1,2", "data.max_train_samples=4,8,16",
                       "train.max_grad_norm=null,1"])
    assert grid == {"train.top_k": [1, 2], "data.max_train_samples": [4, 8, 16],
                    "train.max_grad_norm": [None, 1]}
    pts = expand_grid(r, grid)
    assert len(pts) == 12 and pts[0].overrides == {"train.top_k": 1,
                                                   "data.max_train_samples": 4,
                                                   "train.max_grad_norm": None}
    assert pts[-1].recipe.train.top_k == 2 and pts[-1].recipe.data.max_train_samples == 16
    assert pts[1].label == "train.top_k=1 data.max_train_samples=4 train.max_grad_norm=1"
    assert pts[0].recipe.train.lr == 1e-3  # the recipe's value where the grid says nothing
    for specs, msg in [(["train.lr"], "expected KEY=V1,V2"),
                       (["train.lr=1,2", "train.lr=3"], "given twice"),
                       (["train.lr=1,,2"], "empty value"), (["train.lr=1,1"], "repeated"),
                       ([], "at least one")]:
        with pytest.raises(ConfigError, match=msg):
            parse_grid(specs)
    for spec, msg in [("name=a,b", "not a sweep key"), ("train.lr=1e-4,0.0001", "the same"),
                      ("train.lr=-1,1", "--grid train.lr=-1: field 'train.lr'"),
                      ("data.probe=x", "the sweep probes once")]:
        with pytest.raises(ConfigError, match=msg):
            expand_grid(r, parse_grid([spec]))


def test_report_metrics_v1_and_v2():
    v1 = {"languages": ["en", "zh", "sw"], "n_prompts": 4,
          "summary": {"english_kl": 0.04, "english_top1_agreement": 0.875,
                      "fidelity": {"base": 0.5, "lens": 0.75}},
          "per_language": {"en": {}, "zh": {"fidelity_base": 0.5, "fidelity_lens": 1.0},
                           "sw": {"fidelity_base": 0.5, "fidelity_lens": 0.5}}}
    m = report_metrics(v1)
    assert (m.english_kl, m.english_top1, m.english_identical) == (0.04, 0.875, None)
    assert m.target_gain == 0.25 and m.gain_metric == "fidelity"
    assert (m.languages_up, m.up_metric, m.languages_total) == (1, "fidelity", 2)
    v2 = json.loads(json.dumps(v1))
    v2["summary"] |= {"lpr": {"base": 0.4, "steer": 0.5, "lens": 0.6},
                      "first_token_mass": {"base": 0.1, "lens": 0.35},
                      "english_identical_replies": 0.9}
    v2["per_language"]["zh"] |= {"first_token_mass_base": 0.1, "first_token_mass_lens": 0.3}
    v2["per_language"]["sw"] |= {"first_token_mass_base": 0.1, "first_token_mass_lens": 0.4}
    m = report_metrics(v2)
    assert m.target_gain == pytest.approx(0.25) and m.gain_metric == "first_token_mass"
    assert (m.languages_up, m.up_metric) == (2, "first_token_mass")
    assert m.english_identical == 0.9 and m.lpr.gain == pytest.approx(0.2)


def test_pareto_front():
    pts = [(0.01, 0.1), (0.02, 0.3), (0.02, 0.2), (0.5, 0.3), (None, 1.0), (0.001, 0.0),
           (0.01, 0.1)]
    assert pareto_front(pts) == [True, True, False, False, False, True, True]


def test_update_readme_keeps_the_rest(tmp_path):
    p = tmp_path / "README.md"
    p.write_text("a\n<!-- sweep:begin -->\nx\ny\n<!-- sweep:end -->\nb\n")
    update_readme(p, "| t |\n")
    assert p.read_text() == "a\n<!-- sweep:begin -->\n| t |\n<!-- sweep:end -->\nb\n"
    p.write_text("a\n<!-- sweep:end -->\n<!-- sweep:begin -->\n")
    with pytest.raises(ConfigError, match="comes before"):
        update_readme(p, "t")


def test_cache_key_in_grid_rebuilds_and_says_so(tmp_path, tiny_model):
    """train.top_k changes the training cache: the probe's pass builds the first point's, the
    second point builds its own, and the table says it rebuilt it."""
    from lens_merge.sweep.runner import run_sweep

    r = Recipe.model_validate(_raw(tmp_path, tiny_model("qwen2")))
    res = run_sweep(r, parse_grid(["train.top_k=1,2"]), tmp_path / "sweep")
    rec = res.record
    assert [p.cache for p in rec.points] == ["reused", "built"]
    assert rec.cache_builds == 2 and rec.probe.cache_built
    assert rec.points[0].cache_key != rec.points[1].cache_key
    assert len(list((tmp_path / "sweep" / "work" / "cache").glob("*/cache.json"))) == 2
    rows = [ln for ln in res.table.splitlines() if ln.startswith("| 1 ") or ln.startswith("| 2 ")]
    assert rows[0].endswith("| reused | yes |") or rows[0].endswith("| reused |  |")
    assert "| rebuilt |" in rows[1] and "2 training cache build(s)" in res.table
