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
