"""``lens-merge bench``: lm-eval scores of base and Lens on a local YAML task, bench.json, the
pipeline stage, and the card's ``model-index``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import requires_lm_eval

pytestmark = requires_lm_eval

TASK = "lens_tiny_mc"
ITEMS = [("The capital of France is", ["Paris", "Berlin", "Tokyo", "Cairo"], 0),
         ("Two plus two equals", ["three", "four", "five", "six"], 1),
         ("The sun rises in the", ["west", "north", "east", "south"], 2),
         ("Water freezes at zero degrees", ["Fahrenheit", "Kelvin", "Rankine", "Celsius"], 3),
         ("A week has seven", ["days", "hours", "years", "minutes"], 0),
         ("The opposite of hot is", ["warm", "cold", "red", "tall"], 1),
         ("Bees make", ["milk", "silk", "honey", "bread"], 2),
         ("The color of grass is", ["blue", "purple", "orange", "green"], 3)]


def write_task(folder: Path, name: str = TASK) -> Path:
    """A multiple-choice lm-eval task over a local JSONL (no Hub): acc, acc_norm, brier."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in ITEMS), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
  - metric: brier_score
    aggregation: brier_score
    higher_is_better: false
""", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    """Tiny model, a random delta on disk, the same delta folded, the local task."""
    from lens_merge.testing import random_delta
    from lens_merge.weights.fold import fold

    root = tmp_path_factory.mktemp("bench")
    model = tiny_model("llama3")
    delta_dir = random_delta(model, scale=0.05, seed=0).save(root / "delta")
    fold(model, delta_dir, root / "folded")
    return {"root": root, "model": model, "delta": delta_dir, "folded": root / "folded",
            "tasks": write_task(root / "tasks")}


@pytest.fixture(scope="module")
def scored(setup):
    """``run_bench`` of base + Lens (written to bench.json) and of the folded checkpoint."""
    from lens_merge.bench import run_bench

    out = setup["root"] / "bench.json"
    rep = run_bench(setup["model"], setup["delta"], [TASK], include_path=setup["tasks"],
                    batch_size=4, out=out)
    folded = run_bench(setup["folded"], None, TASK, include_path=setup["tasks"], batch_size=4)
    return {"report": rep, "path": out, "folded": folded}


def test_bench_json_holds_base_and_lens(scored, setup):
    from importlib import metadata

    from lens_merge.bench import read_bench
    from lens_merge.files import file_sha256

    rep = read_bench(scored["path"])
    assert rep == scored["report"]
    assert list(rep.tasks) == [TASK] and rep.requested == [TASK]
    t = rep.tasks[TASK]
    assert set(t.metrics) == {"acc", "acc_norm", "brier_score"}
    assert t.samples == len(ITEMS) and t.num_fewshot == 0 and t.split == "test"
    assert t.output_type == "multiple_choice" and t.config_source.endswith(f"{TASK}.yaml")
    for name in ("acc", "acc_norm"):
        s = t.metrics[name]
        for v in (s.base, s.lens):
            assert 0.0 <= v <= 1.0 and (v * len(ITEMS)).is_integer()
        assert s.stderr["base"] > 0 and s.stderr["lens"] > 0 and s.higher_is_better is True
    brier = t.metrics["brier_score"]
    assert brier.higher_is_better is False
    assert brier.base != brier.lens  # the delta changed the choice probabilities
    assert rep.delta == str(setup["delta"])
    assert rep.delta_sha256 == file_sha256(setup["delta"] / "lens_delta.safetensors")
    assert rep.lm_eval_version == metadata.version("lm_eval")
    assert rep.tool["name"] == "lens-merge" and set(rep.seconds) == {"base", "lens"}
    raw = json.loads(scored["path"].read_text())
    assert raw["tasks"][TASK]["metrics"]["acc"]["stderr"]["lens"] == t.metrics["acc"].stderr["lens"]


def test_lens_in_memory_equals_the_folded_checkpoint(scored):
    """base + delta applied in memory scores exactly as the fold written to disk."""
    rep, folded = scored["report"], scored["folded"]
    assert folded.delta is None and folded.seconds.keys() == {"base"}
    for metric, s in rep.tasks[TASK].metrics.items():
        f = folded.tasks[TASK].metrics[metric]
        assert f.lens is None and f.diff is None
        assert f.base == pytest.approx(s.lens, abs=1e-9), metric


def test_table_rows_and_worse(scored):
    from lens_merge.bench.summary import table_rows, worse

    rep = scored["report"]
    rows = table_rows(rep)
    assert [r[:2] for r in rows] == [[TASK, "acc"], [TASK, "acc_norm"],
                                     [TASK, "brier_score (lower is better)"]]
    s = rep.tasks[TASK].metrics["brier_score"]
    assert rows[2][4] == f"{s.lens - s.base:+.4f}"
    assert s.stderr == {"base": None, "lens": None}  # lm-eval gives brier no stderr
    flagged = {m for _, m, _ in worse(rep)}
    assert "brier_score" not in flagged
    for m in ("acc", "acc_norm"):
        a = rep.tasks[TASK].metrics[m]
        assert (m in flagged) == (a.lens - a.base < -max(a.stderr.values()))


def test_metric_names_of_filtered_and_group_rows():
    """Generation tasks report ``metric,filter``; "N/A" and NaN become None."""
    from lens_merge.bench.run import metrics_of

    row = {"alias": "mgsm_direct_sw", "exact_match,strict-match": 0.1,
           "exact_match_stderr,strict-match": 0.02, "exact_match,flexible-extract": 0.15,
           "exact_match_stderr,flexible-extract": "N/A", "acc,none": float("nan"),
           "acc_stderr,none": 0.5, "sample_len": 250, "samples": 250}
    assert metrics_of(row) == {"exact_match,strict-match": (0.1, 0.02),
                               "exact_match,flexible-extract": (0.15, None),
                               "acc": (None, 0.5)}


def test_unknown_task_is_named_with_a_suggestion(setup):
    from lens_merge.bench import run_bench
    from lens_merge.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"'lens_tiny_mcq'.*did you mean {TASK}"):
        run_bench(setup["model"], None, "lens_tiny_mcq", include_path=setup["tasks"])
    with pytest.raises(ConfigError, match="not a directory"):
        run_bench(setup["model"], None, TASK, include_path=setup["root"] / "nowhere")


def test_delta_for_another_base_is_refused(setup, tiny_model):
    from lens_merge.bench import run_bench
    from lens_merge.errors import DeltaError

    with pytest.raises(DeltaError):
        run_bench(tiny_model("qwen2"), setup["delta"], TASK, include_path=setup["tasks"])


def test_card_model_index_from_bench_json(scored, setup, tmp_path):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import metadata_load

    from lens_merge.release.card import write_card
    from tests._release import NAME, build_release

    root = build_release(tmp_path / NAME, setup["folded"], gguf=False, onnx=False)
    shutil.copy2(scored["path"], root / "report" / "bench.json")
    path = write_card(root)
    meta = metadata_load(path)
    (entry,) = meta["model-index"]
    assert entry["name"] == NAME
    rep = scored["report"].tasks[TASK].metrics
    got = {}
    for res in entry["results"]:
        assert res["task"]["type"] == "text-generation"
        assert res["dataset"]["type"] == TASK and res["dataset"]["name"] == TASK
        assert res["dataset"]["split"] == "test"
        for m in res["metrics"]:
            got[m["type"]] = m["value"]
    assert got == {k: round(s.lens, 4) for k, s in rep.items()}
    card = ModelCard.load(path)
    assert {(r.dataset_type, r.metric_type, r.metric_value) for r in card.data.eval_results} \
        == {(TASK, k, round(s.lens, 4)) for k, s in rep.items()}
    body = card.text
    assert "## Benchmarks" in body
    acc = rep["acc"]
    assert (f"| {TASK} | acc | {acc.base:.4f} ± {acc.stderr['base']:.4f} | "
            f"{acc.lens:.4f} ± {acc.stderr['lens']:.4f} | {acc.lens - acc.base:+.4f} |") in body


def test_card_without_bench_json_has_no_model_index(setup, tmp_path):
    from huggingface_hub.repocard import metadata_load

    from lens_merge.release.card import write_card
    from tests._release import NAME, build_release

    root = build_release(tmp_path / NAME, setup["folded"], gguf=False, onnx=False)
    path = write_card(root)
    assert "model-index" not in metadata_load(path)
    assert "## Benchmarks" not in path.read_text(encoding="utf-8")


def test_recipe_bench_section_and_stage_switch():
    from lens_merge.config import recipe_from
    from lens_merge.errors import ConfigError
    from lens_merge.release.stages import STAGE_NAMES, STAGES

    assert STAGE_NAMES.index("bench") == STAGE_NAMES.index("eval") + 1
    stage = next(s for s in STAGES if s.name == "bench")
    assert stage.outputs == ("bench_report",)
    r = recipe_from({"name": "x"})
    assert r.bench.tasks == [] and not stage.enabled(_Ctx(r))
    r = recipe_from({"name": "x", "bench": {"tasks": ["xcopa_sw", "belebele_swh_Latn"],
                                            "limit": 50}})
    assert stage.enabled(_Ctx(r)) and r.bench.limit == 50
    for bad in ({"tasks": ["a,b"]}, {"tasks": ["a", "a"]}, {"limit": 0}, {"dtype": "int4"},
                {"batch": 2}):
        with pytest.raises(ConfigError, match="bench"):
            recipe_from({"name": "x", "bench": bad})


class _Ctx:
    def __init__(self, recipe):
        self.recipe = recipe


def test_pipeline_bench_stage_writes_report_and_is_cached(setup, tmp_path):
    """``lens-merge run --only bench`` on a release folder holding a delta: report/bench.json,
    then skipped on a rerun with the same inputs, rerun when the task YAML changes."""
    from lens_merge.bench import read_bench
    from lens_merge.config import recipe_from
    from lens_merge.release.pipeline import run_recipe

    tasks = write_task(tmp_path / "tasks")
    recipe = recipe_from({"name": "Rel", "base": str(setup["model"]), "output_dir": str(tmp_path),
                          "languages": ["en", "zh", "ja"], "plan": {"check": False},
                          "bench": {"tasks": [TASK], "include_path": str(tasks),
                                    "batch_size": 4}})
    shutil.copytree(setup["delta"], tmp_path / "Rel" / "delta")
    (res,) = run_recipe(recipe, only=["bench"], push=False)
    assert res.status == "ran" and res.numbers[f"{TASK}/acc"].count("->") == 1
    rep = read_bench(tmp_path / "Rel" / "report" / "bench.json")
    want = json.loads(Path(setup["root"] / "bench.json").read_text())["tasks"][TASK]
    assert rep.model_dump(mode="json")["tasks"][TASK]["metrics"] == want["metrics"]
    (again,) = run_recipe(recipe, only=["bench"], push=False)
    assert again.status == "skipped"
    yaml_file = tasks / f"{TASK}.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("  - metric: brier_score\n"
                                                       "    aggregation: brier_score\n"
                                                       "    higher_is_better: false\n", ""))
    (third,) = run_recipe(recipe, only=["bench"], push=False)
    assert third.status == "ran"
    assert set(read_bench(tmp_path / "Rel" / "report" / "bench.json")
               .tasks[TASK].metrics) == {"acc", "acc_norm"}


def test_cli_prints_base_and_lens(setup, tmp_path):
    from typer.testing import CliRunner

    from lens_merge.bench import read_bench
    from lens_merge.cli import app

    out = tmp_path / "b.json"
    res = CliRunner().invoke(app, ["bench", str(setup["model"]), "--delta", str(setup["delta"]),
                                   "--tasks", TASK, "--include-path", str(setup["tasks"]),
                                   "--limit", "4", "--batch-size", "4", "--out", str(out)],
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    rep = read_bench(out)
    assert rep.limit == 4 and rep.tasks[TASK].samples == 4
    s = rep.tasks[TASK].metrics["acc"]
    assert f"{s.base:.4f}" in res.output and "lens - base" in res.output
    bad = CliRunner().invoke(app, ["bench", str(setup["model"]), "--tasks", TASK,
                                   "--limit", "0"])
    assert bad.exit_code != 0 and "bench.limit" in str(bad.exception)
