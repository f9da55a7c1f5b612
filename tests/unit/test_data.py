"""Loaders: the embedded default set, user JSONL, the reference formats, HF datasets."""

from __future__ import annotations

import json

import pytest

from lens_merge.config import DEFAULT_LANGUAGES
from lens_merge.data import available_languages, load_prompts
from lens_merge.errors import DataError
from lens_merge.lens.langid import identify
from tests.conftest import requires_datasets


def test_default_set_has_every_language_and_a_fixed_heldout_split():
    train = load_prompts("default", DEFAULT_LANGUAGES, split="train")
    held = load_prompts("default", DEFAULT_LANGUAGES, split="heldout")
    assert len(train) == 192 and len(held) == 48
    assert not set(train.texts("en")) & set(held.texts("en"))
    assert set(DEFAULT_LANGUAGES) <= set(available_languages("default"))
    # the held-out split is fixed: every fifth item
    assert held.texts("en")[0] == load_prompts("default", ["en"], split="all").texts("en")[4]


def test_default_translations_are_in_their_language():
    rows = load_prompts("default", DEFAULT_LANGUAGES, split="all")
    for lang in DEFAULT_LANGUAGES:
        hits = sum(identify(t) == lang for t in rows.texts(lang))
        assert hits / len(rows) > 0.7, (lang, hits)


def test_jsonl_with_language_keys(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"en": "Hello there", "zh": "你好", "note": 1}\n\n{"en": "Bye", "zh": "再见"}\n',
                 encoding="utf-8")
    ps = load_prompts(str(p), ["en", "zh"])
    assert ps.texts("zh") == ["你好", "再见"]
    assert load_prompts(str(p), ["en"], max_samples=1).texts("en") == ["Hello there"]


@pytest.mark.parametrize("line, msg", [
    ('{"en": "Hi"}', "row 2: language 'zh' missing"),
    ('{"en": "Hi", "zh": "   "}', "row 2: language 'zh': empty text"),
    ('{"en": "Hi", "zh": 3}', "row 2: language 'zh': empty text"),
    ('{"en": "Hi", "zh": ', "row 2: invalid JSON"),
    ('["en"]', "row 2: expected a JSON object"),
])
def test_bad_rows_name_file_row_and_language(tmp_path, line, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"en": "ok", "zh": "好"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_prompts(str(p), ["en", "zh"])
    assert str(p) in str(e.value) and msg in str(e.value)


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "x.csv").write_text("en,zh\n")
    with pytest.raises(DataError, match="unknown data format '.csv'"):
        load_prompts(str(tmp_path / "x.csv"), ["en"])
    with pytest.raises(DataError, match="data file not found"):
        load_prompts(str(tmp_path / "nope.jsonl"), ["en"])


def test_reference_parallel_json(tmp_path):
    p = tmp_path / "ref.json"
    p.write_text(json.dumps({"Definition": ["x"], "Instances": [
        {"input_en": "Name a fruit.", "input_zh": "说出一种水果。", "output": ""},
        {"input_en": "Count to three.", "input_zh": "数到三。", "output": ""}]}), encoding="utf-8")
    ps = load_prompts(str(p), ["en", "zh"])
    assert ps.texts("zh") == ["说出一种水果。", "数到三。"]
    with pytest.raises(DataError, match="row 1: language 'ja' missing"):
        load_prompts(str(p), ["en", "ja"])


def test_shared_reference_files(shared_lens):
    probe = load_prompts(str(shared_lens / "probe_aya_7lang_300.jsonl"),
                         ["en", "zh", "ja", "ko", "ar", "bn", "sw"])
    assert len(probe) == 300
    train = load_prompts(str(shared_lens / "train_alpaca_parallel_200.json"),
                         ["en", "zh", "ja", "ko", "ar", "bn", "sw"])
    assert len(train) == 200
    assert all(t.strip() for t in train.texts("sw"))


@requires_datasets
def test_saved_hf_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"en": ["One", "Two"], "input_zh": ["一", "二"]})
    ds.save_to_disk(str(tmp_path / "ds"))
    ps = load_prompts(str(tmp_path / "ds"), ["en", "zh"])
    assert ps.texts("zh") == ["一", "二"]
    datasets.Dataset.from_dict({"en": ["One", ""]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad: row 2: language 'en': empty text"):
        load_prompts(str(tmp_path / "bad"), ["en"])
