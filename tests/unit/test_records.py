"""lens_merge.records: errors name the file and the field; ParityReport's verdict follows its
checks and problems."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from lens_merge.errors import LensMergeError, RecordError
from lens_merge.records import (
    PARITY_SCHEMA,
    DeltaMeta,
    ParityCheck,
    ParityReport,
    ParitySet,
    ReleaseLayout,
    RunTable,
    parity_report,
    read_json,
    read_record,
)

SHA = "ab" * 32


def _delta_meta(**kw):
    return {"format": "lens-delta", "format_version": 1,
            "tensors": {"model.layers.3.mlp.up_proj.weight":
                        {"shape": [8, 4], "base_dtype": "F32", "base_sha256": SHA}}} | kw


def _write(tmp_path, obj, name="rec.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj), encoding="utf-8")
    return p


def test_read_record_reads_a_valid_file(tmp_path):
    m = read_record(_write(tmp_path, _delta_meta(top_k=2, extra_key="kept")), DeltaMeta)
    assert m.top_k == 2 and m.tensors["model.layers.3.mlp.up_proj.weight"].shape == [8, 4]
    assert m.model_extra == {"extra_key": "kept"}


@pytest.mark.parametrize("body, field", [
    ({"format_version": 1, "tensors": {}}, "field 'format'"),
    (_delta_meta(format="lens-deltas"), "field 'format'"),
    (_delta_meta(format_version=0), "field 'format_version'"),
    (_delta_meta(tensors={"w": {"shape": [1], "base_dtype": "F32", "base_sha256": "x"}}),
     "field 'tensors.w.base_sha256'"),
    (_delta_meta(top_k="two"), "field 'top_k'"),
    ([1, 2], "field '(top level)'"),
])
def test_read_record_errors_name_file_and_field(tmp_path, body, field):
    p = _write(tmp_path, body)
    with pytest.raises(RecordError) as e:
        read_record(p, DeltaMeta)
    assert isinstance(e.value, LensMergeError)
    assert str(e.value).startswith(f"{p}: ") and field in str(e.value)


def test_read_record_counts_further_errors(tmp_path):
    p = _write(tmp_path, {"tensors": 3})
    with pytest.raises(RecordError, match=r"\(and 2 more\)"):
        read_record(p, DeltaMeta)


@pytest.mark.parametrize("raw, msg", [
    (b'{"a": 1,\n "b": }', "invalid JSON at line 2 column"),
    (b'{"a": "\xff"}', "not UTF-8 text (byte 7)"),
])
def test_read_json_errors_name_the_file(tmp_path, raw, msg):
    p = tmp_path / "bad.json"
    p.write_bytes(raw)
    with pytest.raises(RecordError) as e:
        read_json(p)
    assert str(e.value).startswith(f"{p}: ") and msg in str(e.value)


def test_read_json_missing_and_directory(tmp_path):
    with pytest.raises(RecordError, match=r"nope\.json: no such file"):
        read_json(tmp_path / "nope.json")
    with pytest.raises(RecordError, match="is a directory"):
        read_json(tmp_path)


def test_unknown_keys_are_refused_where_the_schema_is_closed(tmp_path):
    p = _write(tmp_path, {"stages": [{"name": "probe", "status": "ran", "secs": 1}]})
    with pytest.raises(RecordError, match=r"field 'stages\.0\.secs'"):
        read_record(p, RunTable)


# --------------------------------------------------------------------------- ParityReport

def _checks(diff: float, top1: float | None):
    return [ParityCheck.of("max_abs_logit_diff", diff, "<=", 1e-3),
            ParityCheck.of("top1_agreement", top1, ">=", 0.99)]


def test_parity_report_passes_when_every_check_passes():
    r = parity_report("fold", "/out", "/base", checks=_checks(1e-4, 1.0), variant="float32",
                      metrics={"max_abs_logit_diff": 1e-4, "top1_agreement": 1.0})
    assert r.passed and r.failures == [] and r.status == "passed"
    assert r["max_abs_logit_diff"] == 1e-4 and r["kind"] == "fold"


def test_parity_report_failures_name_each_failed_check_and_problem():
    r = parity_report("gguf", "m.gguf", "/base", checks=_checks(0.5, None),
                      problems=["tokenization differs on 'zh'"], variant="q8_0")
    assert not r.passed and r.status == "failed"
    assert r.failures == ["max_abs_logit_diff 0.5 > 0.001", "top1_agreement missing < 0.99",
                          "tokenization differs on 'zh'"]
    only_problem = parity_report("onnx", "a", "b", checks=_checks(0.0, 1.0), problems=["x"])
    assert not only_problem.passed and only_problem.failures == ["x"]


def test_parity_check_limits_are_inclusive_and_directional():
    assert ParityCheck.of("d", 1e-3, "<=", 1e-3).passed
    assert not ParityCheck.of("d", 1.1e-3, "<=", 1e-3).passed
    assert ParityCheck.of("t", 0.99, ">=", 0.99).passed
    assert not ParityCheck.of("t", 0.98, ">=", 0.99).passed
    assert ParityCheck.of("t", 1.0, ">=", 0.99).describe() == "t 1 >= 0.99"


def test_parity_report_round_trips_through_its_json(tmp_path):
    r = parity_report("fold", "/out", "/base", checks=_checks(0.5, 1.0), variant="bfloat16",
                      languages=["en", "zh"], per_language={"zh": {"top1_agreement": 1.0}},
                      n_prompts=4, details={"rows": [{"prompt": 0}]})
    d = r.dump()
    assert d["schema"] == PARITY_SCHEMA and "schema_" not in d and d["passed"] is False
    back = read_record(_write(tmp_path, d), ParityReport)
    assert back == r and back.failures == r.failures and back["rows"] == [{"prompt": 0}]
    with pytest.raises(KeyError):
        back["no_such_metric"]


def test_parity_set_passes_only_when_every_report_passes(tmp_path):
    good = parity_report("onnx", "fp32", "b", checks=_checks(0.0, 1.0), variant="fp32")
    bad = parity_report("onnx", "int8", "b", checks=_checks(0.5, 1.0), variant="int8")
    assert ParitySet(reports=[good]).passed
    s = ParitySet(reports=[good, bad])
    assert not s.passed and s.failures == ["onnx int8: max_abs_logit_diff 0.5 > 0.001"]
    back = read_record(_write(tmp_path, s.dump()), ParitySet)
    assert [r.variant for r in back.reports] == ["fp32", "int8"] and not back.passed


def test_release_layout_paths(tmp_path):
    lay = ReleaseLayout(root=tmp_path)
    assert lay.path("delta_meta") == tmp_path / "delta" / "lens_delta.json"
    assert lay.verify_files["gguf"] == "report/gguf_verify.json"
    with pytest.raises(ValidationError, match="frozen"):
        lay.card = "x"
