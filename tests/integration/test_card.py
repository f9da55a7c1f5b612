"""Model card and its pictures: metadata that ModelCard reads back, tables, snippets, PNGs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from lens_merge.errors import DataError, PublishError
from tests._release import LANGS, NAME, build_release, record_all
from tests.conftest import requires_onnx


@pytest.fixture(scope="module")
def fake_base(tmp_path_factory) -> Path:
    """Where the delta says the base lives: a config naming a Hub id and a README license."""
    d = tmp_path_factory.mktemp("base")
    (d / "config.json").write_text(json.dumps({"_name_or_path": "acme/tiny-base",
                                               "model_type": "llama"}))
    (d / "README.md").write_text("---\nlicense: mit\n---\n# tiny base\n")
    return d


@pytest.fixture(scope="module")
def release_template(tmp_path_factory, tiny_model, fake_base) -> Path:
    base_meta = {"ref": str(fake_base), "path": str(fake_base), "model_type": "llama",
                 "architecture": "llama", "num_hidden_layers": 4, "config_sha256": "cd" * 32}
    return build_release(tmp_path_factory.mktemp("rel") / NAME, tiny_model("llama"), base_meta)


@pytest.fixture
def release(tmp_path, release_template) -> Path:
    return Path(shutil.copytree(release_template, tmp_path / NAME))


def _section(text: str, heading: str, lang: str) -> str:
    m = re.search(rf"### {re.escape(heading)}\n\n(?:[^\n]*\n\n)?```{lang}\n(.*?)```", text, re.S)
    assert m, f"no {lang} block under {heading}"
    return m.group(1)


def test_card_metadata_tables_and_pictures(release):
    from huggingface_hub import ModelCard
    from matplotlib.image import imread

    from lens_merge.release.card import write_card
    from lens_merge.weights.delta import LensDelta

    path = write_card(release)
    assert path == release / "README.md"
    card = ModelCard.load(path)
    d = card.data
    assert d.base_model == "acme/tiny-base"
    assert d.base_model_relation == "finetune"
    assert d.language == LANGS
    assert d.license == "mit"
    assert d.library_name == "transformers"
    assert d.pipeline_tag == "text-generation"
    has_onnx = (release / "onnx").is_dir()  # needs the onnx package to write the tiny graph
    assert set(d.tags) >= {"lens", "multilingual", "gguf"} | ({"onnx"} if has_onnx else set())
    text = card.text
    for png in ("report/states_2d.png", "report/losses.png"):
        assert f"]({png})" in text
        raw = (release / png).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        h, w = imread(release / png).shape[:2]
        assert h > 200 and w > 300
    # results table: numbers from lens_report.json
    assert "| Cosine to the English parallel, language-specific part removed | 0.4722 | 0.5950 |" \
        in text
    assert "| Replies in the prompt's language (target languages) | 37.5% | 62.5% |" in text
    assert "| `zh` | 25.0% | 75.0% | 0.5123 | 0.6345 | 0.1250 | 0.8750 |" in text
    assert "English top-1 agreement with the base | | 93.8% |" in text
    # parity checks
    assert re.search(r"Folded checkpoint .*\| passed \| max_abs_logit_diff 1\.5e-06", text)
    assert f"GGUF `{NAME}-F16.gguf` (llama.cpp) vs checkpoint | passed" in text
    if has_onnx:
        assert "ONNX Runtime `fp32` vs checkpoint | passed | max_abs_logit_diff 2.5e-05" in text
    # usage: exact GGUF name, ONNX subfolder, repo placeholder
    sh = _section(text, "llama.cpp", "sh")
    assert f"llama-cli -m {NAME}-F16.gguf -p 'prompt in zh' -n 64" in sh
    if has_onnx:
        assert 'subfolder="onnx", file_name="model.onnx"' in _section(text, "ONNX Runtime",
                                                                      "python")
    assert f'repo = "your-username/{NAME}"' in text
    # what Lens changed and provenance
    assert "align 0.5" in text and "**Blocks**: 2, 3 of 4" in text
    delta = LensDelta.load(release / "delta")
    for n in delta.names:
        assert f"| `{n}` | `{delta.base_hash(n)}` |" in text
    assert "cd" * 32 in text and f"name: {NAME}" in text


def _report_v2(steering: bool) -> dict:
    """A format_version 2 report (``lens_merge.lens.evaluate``) on top of the v1 fixture's."""
    from tests._release import lens_report

    rep = lens_report()
    bs = ["base", "steer", "lens"] if steering else ["base", "lens"]
    vals = {"en": (0.9375, 0.875, 0.9375, 0.0), "zh": (0.25, 0.5, 0.625, 0.125),
            "ja": (0.125, 0.25, 0.375, 0.0625)}  # LPR base, steer, lens; echo
    for lang, (b, st, ln) in ((k, v[:3]) for k, v in vals.items()):
        r = rep["per_language"][lang]
        for br, x in zip(("base", "steer", "lens"), (b, st, ln), strict=True):
            if br in bs:
                r |= {f"lpr_{br}": x, f"lpr_ci_{br}": [x / 2, (1 + x) / 2],
                      f"echo_{br}": vals[lang][3], f"first_token_mass_{br}": x / 4}
    s = rep["summary"]
    s |= {"lpr": {b: (vals["zh"][i] + vals["ja"][i]) / 2 for i, b in
                  enumerate(("base", "steer", "lens")) if b in bs},
          "lpr_ci": {b: [0.1, 0.6] for b in bs}, "echo": {b: 0.09375 for b in bs},
          "first_token_mass": {b: 0.0625 for b in bs}, "english_top1_agreement_ci": [0.7, 0.99],
          "english_identical_replies": 0.8125, "english_identical_replies_ci": [0.57, 0.93],
          "english_lpr": {b: 0.9375 for b in bs}}
    if steering:
        s |= {"english_kl_steer": 0.0, "english_top1_agreement_steer": 1.0,
              "english_identical_replies_steer": 1.0,
              "steering": {"alpha": {"zh": 4.0, "ja": 2.0}, "layer": 2, "chosen_on": "rows",
                           "note": "English prompts are not steered."},
              "steering_vs_lens": {"kl_tolerance": 0.01, "english_kl": {"steer": 0.0,
                                                                         "lens": 0.0123},
                                   "matched": False, "better": None,
                                   "lpr": {"steer": 0.375, "lens": 0.5},
                                   "first_token_mass": {"steer": 0.0625, "lens": 0.0625}}}
    return rep | {"format_version": 2, "branches": bs}


def test_card_fidelity_tables_from_a_v2_report(release):
    """Per language LPR with its interval, echo and first-token mass of base / steering / Lens;
    the English table; the steering vs Lens line from the report's comparison."""
    from lens_merge.release.card import write_card

    (release / "report" / "lens_report.json").write_text(json.dumps(_report_v2(True)))
    text = write_card(release).read_text()
    assert ("| Language | LPR base | LPR steering | LPR Lens | Echo (base / steering / Lens) "
            "| First-token mass (base / steering / Lens) |") in text
    assert ("| `zh` | 25.0% (12.5-62.5) | 50.0% (25.0-75.0) | 62.5% (31.2-81.2) "
            "| 12.5% / 12.5% / 12.5% | 0.0625 / 0.1250 / 0.1562 |") in text
    assert "| mean (targets) | 18.8% (10.0-60.0) | 37.5% (10.0-60.0) | 50.0% (10.0-60.0) |" \
        in text
    assert "| English, vs the base | steering | Lens |" in text  # a report without the count
    assert "| Next-token KL(base ‖ ·), mean | 0.0000 | 0.0123 |" in text
    rep = _report_v2(True)
    rep["summary"]["english_prompts"] = 48
    (release / "report" / "lens_report.json").write_text(json.dumps(rep))
    assert "| English (48 held-out prompts), vs the base | steering | Lens |" in \
        write_card(release).read_text()
    assert "| Top-1 agreement | 100.0% | 93.8% (70.0-99.0) |" in text
    assert "| Greedy replies identical to the base's | 100.0% | 81.2% (57.0-93.0) |" in text
    assert ("Not comparable at matched English KL (they differ by more than 0.0100 nats) and "
            "neither is better on both: mean LPR steering 37.5% vs Lens 50.0%") in text
    assert "alpha `zh` 4, `ja` 2 at block 2" in text
    # the v1 tables stay; a v2 report without steering has no steering column
    assert "| `zh` | 25.0% | 75.0% | 0.5123 | 0.6345 | 0.1250 | 0.8750 |" in text
    (release / "report" / "lens_report.json").write_text(json.dumps(_report_v2(False)))
    text = write_card(release).read_text()
    assert "| Language | LPR base | LPR Lens | Echo (base / Lens) |" in text
    assert "| `ja` | 12.5% (6.2-56.2) | 37.5% (18.8-68.8) | 6.2% / 6.2% | 0.0312 / 0.0938 |" \
        in text
    assert "steering" not in text.split("## Results")[1].split("## Parity")[0]


def test_card_without_exports(release):
    from huggingface_hub import ModelCard

    from lens_merge.release.card import write_card

    for p in ("gguf", "onnx"):
        shutil.rmtree(release / p, ignore_errors=True)
    for p in ("gguf_verify.json", "onnx_verify.json", "mean_states.safetensors"):
        (release / "report" / p).unlink(missing_ok=True)
    (release / "report" / "states_2d.png").unlink(missing_ok=True)
    card = ModelCard.load(write_card(release, repo_id="me/tiny"))
    assert not {"gguf", "onnx"} & set(card.data.tags)
    assert "llama-cli" not in card.text and "ORTModelForCausalLM" not in card.text
    assert "states_2d.png" not in card.text and "](report/losses.png)" in card.text
    assert 'repo = "me/tiny"' in card.text


def test_card_license_and_base_from_default_marker(release, tmp_path):
    from huggingface_hub import ModelCard

    from lens_merge.release.card import write_card

    d = tmp_path / "smol"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "lens_merge_default.json").write_text(json.dumps(
        {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}))
    meta_p = release / "delta" / "lens_delta.json"
    meta = json.loads(meta_p.read_text())
    meta["base"] = {"ref": "default", "path": str(d)}
    meta_p.write_text(json.dumps(meta))
    card = ModelCard.load(write_card(release))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0"
    recipe = {"name": "Other", "release": {"license": "cc-by-4.0", "repo_id": "org/x"}}
    card = ModelCard.load(write_card(release, recipe=recipe))
    assert card.data.license == "cc-by-4.0" and 'repo = "org/x"' in card.text
    assert card.text.lstrip().startswith("# Other")


def test_card_needs_delta_and_model(release):
    from lens_merge.release.card import write_card

    shutil.rmtree(release / "delta")
    with pytest.raises(PublishError, match="lens_delta.json"):
        write_card(release)
    shutil.rmtree(release / "model")
    with pytest.raises(PublishError, match="model"):
        write_card(release)


def _staged_snippet(release: Path, tmp_path: Path, heading: str) -> tuple[Path, str]:
    from lens_merge.release.card import write_card
    from lens_merge.release.push import repo_layout, stage, staged_card

    record_all(release)  # the files this test put in, as the pipeline would record them
    write_card(release)
    repo = tmp_path / "repo"
    stage(repo_layout(release), repo, staged_card(release, "me/tiny"))
    code = _section((repo / "README.md").read_text(), heading, "python")
    assert 'repo = "me/tiny"' in code
    return repo, code


def test_transformers_snippet_runs_on_repo_layout(release, tmp_path, tiny_tokenizer_dir):
    """The card's transformers snippet, run against the repository layout push uploads."""
    shutil.copy2(tiny_tokenizer_dir / "chat_template.jinja", release / "model")
    repo, code = _staged_snippet(release, tmp_path, "transformers")
    assert "apply_chat_template" in code
    ns: dict = {}
    exec(code.replace('"me/tiny"', json.dumps(str(repo))), ns)  # noqa: S102 - our own snippet
    new = ns["out"].shape[1] - ns["inputs"]["input_ids"].shape[1]
    assert 1 <= new <= 64


@requires_onnx
def test_onnx_snippet_runs_on_repo_layout(release, tmp_path, tiny_tokenizer_dir):
    """A real optimum export in onnx/, loaded by the card's ONNX Runtime snippet, which applies
    the chat template as the transformers one does."""
    from optimum.exporters.onnx import main_export

    shutil.copy2(tiny_tokenizer_dir / "chat_template.jinja", release / "model")
    shutil.rmtree(release / "onnx")
    main_export(str(release / "model"), str(release / "onnx"), task="text-generation-with-past")
    repo, code = _staged_snippet(release, tmp_path, "ONNX Runtime")
    assert "apply_chat_template" in code
    ns: dict = {}
    exec(code.replace('"me/tiny"', json.dumps(str(repo))), ns)  # noqa: S102 - our own snippet
    assert type(ns["model"]).__name__ == "ORTModelForCausalLM"
    new = ns["out"].shape[1] - ns["inputs"]["input_ids"].shape[1]
    assert 1 <= new <= 64


def test_project_states_keeps_planar_geometry():
    import numpy as np

    from lens_merge.release.plots import project_states

    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(64, 2)))[0]  # a 2-D plane in R^64
    pts = rng.normal(size=(6, 2)) @ basis.T + 3.0
    b2, l2, ratio = project_states(pts[:3], pts[3:])
    xy = np.concatenate([b2, l2])
    d_in = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    d_out = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.testing.assert_allclose(d_out, d_in, atol=1e-9)
    assert sum(ratio) == pytest.approx(1.0) and ratio[0] >= ratio[1]


def test_plots_read_their_inputs(release, tmp_path):
    from safetensors.numpy import save_file

    from lens_merge.release.plots import plot_losses, plot_states

    res = plot_losses(release / "report" / "train_log.jsonl", tmp_path / "l.png")
    assert res["series"]["separate"][3] == (4, pytest.approx(0.125))
    assert [s for s, _ in res["series"]["loss"]] == list(range(1, 11))
    assert (tmp_path / "l.png").stat().st_size > 5000
    st = plot_states(release / "report" / "mean_states.safetensors", tmp_path / "s.png")
    assert st["languages"] == LANGS and len(st["lens_xy"]) == 3
    bad = tmp_path / "bad.safetensors"
    import numpy as np

    save_file({"base": np.zeros((2, 4), np.float32), "lens": np.zeros((2, 4), np.float32)},
              str(bad), metadata={"languages": "en,zh,ja"})
    with pytest.raises(DataError, match="names 3 languages"):
        plot_states(bad, tmp_path / "x.png")
    (tmp_path / "log.jsonl").write_text('{"epoch": 0}\n')
    with pytest.raises(DataError, match="'step' missing"):
        plot_losses(tmp_path / "log.jsonl", tmp_path / "y.png")
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()
