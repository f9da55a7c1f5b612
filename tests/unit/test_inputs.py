"""Every input is checked at the boundary: one typed error line naming the file and cause.

Model-free: checkpoints here are tiny tensors written by safetensors itself.
"""

from __future__ import annotations

import errno
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lens_merge.config import check_recipe, load_recipe
from lens_merge.data import load_prompts
from lens_merge.errors import (
    ConfigError,
    DataError,
    DeltaError,
    LensMergeError,
    ModelError,
    OutputError,
)
from lens_merge.weights.checkpoint import (
    SAFE_INDEX,
    Checkpoint,
    check_shard,
    read_index,
    read_safetensors_header,
)

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a.weight": rng.standard_normal((3, 4)).astype(np.float32),
            "b.bias": rng.standard_normal(5).astype(np.float16)}


def _write_shard(path: Path, seed: int = 0) -> Path:
    save_file(_tensors(seed), str(path), metadata={"format": "pt"})
    return path


def _with_header(path: Path, header: object, data: bytes = b"", raw: bytes | None = None) -> Path:
    body = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


@pytest.fixture
def sharded(tmp_path) -> Path:
    """A two-shard checkpoint with an index (what ``fold`` reads)."""
    d = tmp_path / "base"
    d.mkdir()
    wm = {}
    for i in (1, 2):
        name = f"model-0000{i}-of-00002.safetensors"
        save_file({f"layer{i}.weight": np.full((64, 64), i, np.float32)}, str(d / name))
        wm[f"layer{i}.weight"] = name
    (d / SAFE_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (d / "config.json").write_text("{}")
    return d


def _fails(exc_type, match: str, fn, *args, **kw) -> str:
    with pytest.raises(exc_type) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert match in msg, msg
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- safetensors


def test_valid_shard_reads(tmp_path):
    p = _write_shard(tmp_path / "ok.safetensors")
    entries = check_shard(p)
    assert {e.name: e.shape for e in entries.values()} == {"a.weight": (3, 4), "b.bias": (5,)}


def test_truncated_shard_is_named_truncated(tmp_path):
    p = _write_shard(tmp_path / "t.safetensors")
    size = p.stat().st_size
    with open(p, "r+b") as fh:
        fh.truncate(size - 6)
    msg = _fails(ModelError, "truncated: header promises", check_shard, p)
    assert f"promises {size} bytes, file has {size - 6}" in msg and str(p) in msg


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_bytes(b"abc"), "shorter than the 8-byte header length"),
    (lambda p: p.write_bytes(struct.pack("<Q", 10**12) + b"{}"), "header length"),
    (lambda p: p.write_bytes(struct.pack("<Q", 4000) + b"{}"), "truncated"),
    (lambda p: _with_header(p, None, raw=b'{"\xff": 1}'), "not UTF-8"),
    (lambda p: _with_header(p, None, raw=b"{nope"), "invalid JSON"),
    (lambda p: _with_header(p, [1, 2]), "a JSON list, expected an object"),
    (lambda p: _with_header(p, {"t": 3}), "header entry is a int"),
    (lambda p: _with_header(p, {"t": {"shape": [1], "data_offsets": [0, 4]}}, b"x" * 4),
     "dtype None unknown"),
    (lambda p: _with_header(p, {"t": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}},
                            b"x" * 4), "dtype 'Q4' unknown"),
    (lambda p: _with_header(p, {"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
                            b"x" * 4), "shape [-1]"),
    (lambda p: _with_header(p, {"t": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
                            b"x" * 4), "shape [True]"),
    (lambda p: _with_header(p, {"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}},
                            b"x" * 4), "data_offsets [4, 0]"),
    (lambda p: _with_header(p, {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
                            b"x" * 4), "shape [2] x F32 needs 8"),
    (lambda p: _with_header(p, {"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                "u": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}},
                            b"x" * 6), "overlaps tensor"),
    (lambda p: _with_header(p, {"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
                            b"x" * 8), "gap in the data"),
    (lambda p: _with_header(p, {"__metadata__": {"a": 1}}), "__metadata__"),
    (lambda p: _with_header(p, {"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                            b"x" * 9), "trailing data"),
    (lambda p: p.mkdir(), "is a directory"),
])
def test_bad_safetensors_files(tmp_path, make, words):
    p = tmp_path / "bad.safetensors"
    make(p)
    msg = _fails(ModelError, words, read_safetensors_header, p)
    assert str(p) in msg


def test_header_checker_raises_the_callers_error(tmp_path):
    p = _with_header(tmp_path / "x.safetensors", [])
    _fails(DeltaError, "expected an object", read_safetensors_header, p, DeltaError)


# ----------------------------------------------------------------------------- checkpoints


def test_truncated_untouched_shard_fails_at_open(sharded):
    """Reproduction: ``truncate -s 6M BASE/model-00001-of-00002.safetensors; fold ...`` copied
    the shard truncated. Every shard is now checked when the checkpoint is opened."""
    shard = sharded / "model-00001-of-00002.safetensors"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    msg = _fails(ModelError, "truncated: header promises", Checkpoint.open, sharded)
    assert str(shard) in msg and "not the checkpoint" not in msg
    assert Checkpoint.open(sharded, check=False).shards  # opt out, e.g. for a quick listing


def test_index_places_a_tensor_the_shard_lacks(sharded):
    idx = json.loads((sharded / SAFE_INDEX).read_text())
    idx["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (sharded / SAFE_INDEX).write_text(json.dumps(idx))
    _fails(ModelError, "holds no tensor 'ghost.weight'", Checkpoint.open, sharded)
    _fails(ModelError, "holds no tensor 'ghost.weight'",
           Checkpoint.open(sharded, check=False).entry, "ghost.weight")


@pytest.mark.parametrize("index, words", [
    (b"\xff\xfe", "not UTF-8"),
    (b"{", "invalid JSON"),
    (b"[]", "a JSON list, expected an object"),
    (b"{}", "no 'weight_map' object"),
    (b'{"weight_map": {}}', "or it is empty"),
    (b'{"weight_map": {"t": 3}}', "shard name 3 is a int"),
    (b'{"weight_map": {"t": "../outside.safetensors"}}', "not a plain file name"),
    (b'{"weight_map": {"t": "/etc/passwd"}}', "not a plain file name"),
    (b'{"weight_map": {"t": "sub/x.safetensors"}}', "not a plain file name"),
    (b'{"weight_map": {"t": ""}}', "not a plain file name"),
    (b'{"weight_map": {"t": "missing.safetensors"}}', "names shard missing.safetensors"),
    (b'{"weight_map": {"t": "a.safetensors"}, "metadata": [1]}', "'metadata' is a list"),
])
def test_bad_index_files(tmp_path, index, words):
    (tmp_path / "a.safetensors").write_bytes(b"")
    p = tmp_path / SAFE_INDEX
    p.write_bytes(index)
    msg = _fails(ModelError, words, read_index, p)
    assert str(p) in msg


def test_bad_config_json(sharded):
    (sharded / "config.json").write_bytes(b"\xff")
    _fails(ModelError, "not UTF-8", Checkpoint.open(sharded).config)
    (sharded / "config.json").write_text("[1]")
    _fails(ModelError, "expected an object", Checkpoint.open(sharded).config)


# ----------------------------------------------------------------------------- deltas


@pytest.fixture
def delta_dir(tmp_path) -> Path:
    import torch

    from lens_merge.weights.delta import LensDelta

    base = {"w": torch.zeros(2, 3), "v": torch.zeros(4)}
    trained = {"w": torch.ones(2, 3), "v": torch.full((4,), 0.5)}
    d = LensDelta.from_weights(base, trained, {"w": "a" * 64, "v": "b" * 64},
                               {"languages": ["en", "zh"], "top_k": 1})
    return d.save(tmp_path / "delta")


def _edit_meta(d: Path, fn) -> None:
    p = d / "lens_delta.json"
    meta = json.loads(p.read_text())
    fn(meta)
    p.write_text(json.dumps(meta))


def test_delta_round_trip(delta_dir):
    from lens_merge.weights.delta import LensDelta

    d = LensDelta.load(delta_dir)
    assert sorted(d.names) == ["v", "w"] and d.languages == ["en", "zh"]
    assert float(d.tensors["v"][0]) == 0.5 and d.meta["top_k"] == 1


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.update(format="other"), "field 'format' is 'other'"),
    (lambda m: m.update(format_version=99), "format_version 99 is newer"),
    (lambda m: m.update(format_version="x"), "field 'format_version'"),
    (lambda m: m.update(tensors=[]), "field 'tensors'"),
    (lambda m: m["tensors"]["w"].update(base_sha256="zz"), "field 'tensors.w.base_sha256'"),
    (lambda m: m["tensors"]["w"].update(shape=[3, 2]), "has shape [2, 3], lens_delta.json "
                                                       "records [3, 2]"),
    (lambda m: m["tensors"].pop("w"), "disagree on tensor names"),
    (lambda m: m.update(languages="en"), "field 'languages'"),
    (lambda m: m.update(top_k=0), "field 'top_k'"),
])
def test_bad_delta_meta(delta_dir, edit, words):
    from lens_merge.weights.delta import LensDelta

    _edit_meta(delta_dir, edit)
    msg = _fails(DeltaError, words, LensDelta.load, delta_dir)
    assert "lens_delta" in msg


def test_delta_meta_not_json_or_not_utf8(delta_dir):
    from lens_merge.weights.delta import LensDelta

    (delta_dir / "lens_delta.json").write_bytes(b"\xff")
    _fails(DeltaError, "not UTF-8", LensDelta.load, delta_dir)
    (delta_dir / "lens_delta.json").write_text("[1, 2")
    _fails(DeltaError, "invalid JSON", LensDelta.load, delta_dir)


def test_delta_weights_truncated_nonfinite_or_not_float(delta_dir):
    import torch
    from safetensors.torch import save_file as save_pt

    from lens_merge.weights.delta import LensDelta

    w = delta_dir / "lens_delta.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[:-4])
    _fails(DeltaError, "truncated: header promises", LensDelta.load, delta_dir)
    save_pt({"w": torch.full((2, 3), float("nan")), "v": torch.zeros(4)}, str(w))
    _fails(DeltaError, "tensor w holds NaN or Inf", LensDelta.load, delta_dir)
    save_pt({"w": torch.zeros(2, 3, dtype=torch.int32), "v": torch.zeros(4)}, str(w))
    _fails(DeltaError, "tensor w is I32, expected a float dtype", LensDelta.load, delta_dir)


def test_delta_save_refuses_a_dangling_symlink_without_overwrite(tmp_path, delta_dir):
    from lens_merge.weights.delta import LensDelta

    d = LensDelta.load(delta_dir)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    _fails(DeltaError, "exists", d.save, link)


# ----------------------------------------------------------------------------- data


def test_language_id_is_not_the_row_id():
    """Reproduction: ``verify BASE DELTA FOLDED -l en,id`` took the row ids for prompts."""
    from lens_merge.parity.prompts import parity_prompts

    msg = _fails(DataError, "language 'id' missing", load_prompts, "default", ["en", "id"])
    assert "input_id" in msg and "a001" not in msg
    _fails(DataError, "language 'id' missing", parity_prompts, ["en", "id"])


def test_indonesian_as_input_id(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"id": "row-1", "en": "Hello", "input_id": "Halo"}) + "\n"
                 + json.dumps({"id": "row-2", "input_en": "Bye", "input_id": "Dah"}) + "\n",
                 encoding="utf-8")
    ps = load_prompts(str(p), ["en", "id"])
    assert ps.texts("id") == ["Halo", "Dah"] and ps.texts("en") == ["Hello", "Bye"]


def test_data_files_not_utf8_or_malformed(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"en": "caf\xe9"}\n')
    _fails(DataError, "not UTF-8", load_prompts, str(p), ["en"])
    j = tmp_path / "d.json"
    j.write_text('{"Instances": 3}')
    _fails(DataError, "'Instances' is a int", load_prompts, str(j), ["en"])
    d = tmp_path / "notads"
    d.mkdir()
    pytest.importorskip("datasets")
    _fails(DataError, "not a saved HF dataset", load_prompts, str(d), ["en"])


# ----------------------------------------------------------------------------- recipes


def test_non_utf8_recipe(tmp_path):
    """Reproduction: ``printf 'name: a\\xff\\n' > W/r.yaml && lens-merge run W/r.yaml``."""
    p = tmp_path / "r.yaml"
    p.write_bytes(b"name: a\xff\n")
    _fails(ConfigError, f"{p}: not UTF-8 text", load_recipe, p)


@pytest.mark.parametrize("body, words", [
    ("name: x\ndata: {max_length: 100000000000000000000}\n", "field 'data.max_length'"),
    ("name: x\ndata: {max_length: 1e20}\n", "field 'data.max_length'"),
    ("name: x\ndata: {max_length: 96.0}\n", "expected an integer, got 96.0"),
    ("name: x\ntrain: {epochs: true}\n", "expected an integer, got True"),
    ("name: x\ntrain: {lr: .inf}\n", "field 'train.lr'"),
    ("name: x\ntrain: {seed: -1}\n", "field 'train.seed'"),
    ("name: x\nexport: {gguf: {outtypes: [f16, q3_k]}}\n", "'q3_k' is not supported"),
    ("name: x\nexport: {gguf: {outtypes: [f16, F16]}}\n", "must be unique"),
    ("name: x\nlanguages: [en, zn]\n", "unknown language code(s) 'zn'"),
    ("name: x\ndevice: gpu\n", "field 'device'"),
    ("name: x\nrelease: {repo_id: 'a/b/c'}\n", "field 'release.repo_id'"),
    ("name: x\nwhen: 2024-13-45\n", "invalid YAML value"),
    ("name: [unclosed\n", "invalid YAML"),
    ("", "expected a mapping"),
    ("name: x\ntrian: {}\ntrain: {lr: -1}\n",
     "field 'train.lr': Input should be greater than 0; unknown key 'trian'"),
])
def test_recipe_values_fail_at_load(tmp_path, body, words):
    p = tmp_path / "r.yaml"
    p.write_text(body, encoding="utf-8")
    msg = _fails(ConfigError, words, load_recipe, p)
    assert str(p) in msg


def test_recipe_with_language_codes_and_subtags(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nlanguages: [en, id, pt-BR]\n")
    assert load_recipe(p).languages == ["en", "id", "pt-BR"]


def test_check_recipe_data_and_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load_recipe(RECIPES / "default.yaml")
    check_recipe(r)  # the shipped recipe: default data has every language
    for body, exc, words in [
        ("name: x\nlanguages: [en, id]\n", DataError, "recipe data.probe"),
        ("name: x\ndata: {train: nope.jsonl}\n", DataError, "nope.jsonl: data file not found"),
        ("name: x\nbase: ./no-model\n", ModelError, "not an existing directory"),
    ]:
        p = tmp_path / "r.yaml"
        p.write_text(body)
        _fails(exc, words, check_recipe, load_recipe(p))
    (tmp_path / "d.jsonl").write_text('{"en": "hi", "zh": "你好"}\n', encoding="utf-8")
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nlanguages: [en, zh, ja]\ndata: {probe: d.jsonl}\n")
    _fails(DataError, "language 'ja' missing", check_recipe, load_recipe(p))
    p.write_text("name: x\nlanguages: [en, zh, ja]\ndata: {probe: d.jsonl}\n")
    check_recipe(load_recipe(p), stages=["fold"])  # the data is not read by --only fold
    (tmp_path / "file").write_text("")
    p.write_text("name: x\noutput_dir: file/out\n")
    _fails(OutputError, "is a file, not a directory", check_recipe, load_recipe(p))
    p.write_text("name: x\noutput_dir: .\ndata: {train: x/d.jsonl}\n")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "d.jsonl").write_text('{"en": "a", "zh": "b", "ja": "c", "ko": "d", '
                                            '"ar": "e", "bn": "f", "sw": "g", "es": "h", '
                                            '"fr": "i", "de": "j"}\n', encoding="utf-8")
    _fails(OutputError, "contains the data.train source", check_recipe, load_recipe(p))


# ----------------------------------------------------------------------------- CLI


def _main(*args) -> int:
    from lens_merge.cli import main

    old = sys.argv
    sys.argv = ["lens-merge", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old


@pytest.fixture
def boom():
    """A throwaway ``boom`` command raising whatever the test puts in ``raise_``."""
    from lens_merge.cli import app

    state: dict = {}

    def boom_cmd() -> None:
        raise state["exc"]

    app.command("boom")(boom_cmd)
    yield state
    app.registered_commands[:] = [c for c in app.registered_commands if c.name != "boom"]


def _err_lines(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x.strip()]


def test_cli_library_error_is_one_line(boom, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal must not wrap the line
    boom["exc"] = ConfigError("r.yaml: field 'a': x\nsecond line " + "long " * 20)
    assert _main("boom") == 1
    lines = _err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("error: r.yaml: field 'a': x second line")


def test_cli_internal_error_is_one_line_exit_2(boom, capsys):
    boom["exc"] = KeyError("weights")
    assert _main("boom") == 2
    assert _err_lines(capsys) == ["error: internal error: KeyError: 'weights' (run with --debug "
                                  "for the traceback)"]


def test_cli_debug_shows_the_traceback(boom, capsys):
    boom["exc"] = ValueError("deep down")
    assert _main("--debug", "boom") == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "boom_cmd" in err
    assert err.strip().splitlines()[-1].startswith("error: internal error: ValueError")
    boom["exc"] = ValueError("again")
    assert _main("boom") == 2  # --debug does not stick to the next call
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on device"),
                                         (errno.EROFS, "read-only file system"),
                                         (errno.EFBIG, "file too large for the file system"),
                                         (errno.EACCES, "permission denied")])
def test_cli_os_errors_name_the_path(boom, capsys, code, words):
    boom["exc"] = OSError(code, "x", "/data/out/model.gguf")
    assert _main("boom") == 1
    assert _err_lines(capsys) == [f"error: /data/out/model.gguf: {words} "
                                  f"({errno.errorcode[code]})"]


def test_cli_run_with_non_utf8_recipe(tmp_path, capsys):
    p = tmp_path / "r.yaml"
    p.write_bytes(b"name: a\xff\n")
    assert _main("run", p) == 1
    assert _err_lines(capsys) == [f"error: {p}: not UTF-8 text (byte 7)"]


def test_cli_probe_option_errors_are_config_errors(tmp_path, capsys):
    assert _main("probe", "-o", tmp_path / "sub", "--pooling", "max") == 1
    (line,) = _err_lines(capsys)
    assert "command-line options: field 'probe.pooling'" in line
    assert _main("probe", "-o", tmp_path / "sub", "-l", "zh,en") == 1
    assert "field 'languages'" in _err_lines(capsys)[0]


def test_every_error_class_is_a_lens_merge_error():
    import lens_merge.errors as errors

    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert all(issubclass(c, LensMergeError) for c in classes)
