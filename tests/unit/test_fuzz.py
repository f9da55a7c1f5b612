"""Property-based fuzz of every input format the tool parses.

Targets: recipe YAML (mutations of ``recipes/default.yaml``), ``lens_delta.json``, safetensors
headers (and truncations of a small valid file), checkpoint index files. Each mutation (keys
deleted or inserted, values swapped for other types, random bytes, truncation) must end in
success or a ``LensMergeError``, never in another exception. A safetensors file the checker
accepts must also be readable by the safetensors library itself.

Model-free and deterministic (``derandomize``): 300 examples per target. For a deeper hunt:
``LENS_MERGE_FUZZ_EXAMPLES=5000 LENS_MERGE_FUZZ_RANDOM=1 pytest tests/unit/test_fuzz.py``.
"""

from __future__ import annotations

import copy
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from lens_merge.config import check_recipe, load_recipe
from lens_merge.errors import LensMergeError
from lens_merge.weights.checkpoint import SAFE_INDEX, Checkpoint, check_shard

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
DEFAULT_YAML = (RECIPES / "default.yaml").read_bytes()

FUZZ = settings(max_examples=int(os.environ.get("LENS_MERGE_FUZZ_EXAMPLES", "300")),
                derandomize=os.environ.get("LENS_MERGE_FUZZ_RANDOM", "") in ("", "0"),
                deadline=None, database=None, suppress_health_check=list(HealthCheck),
                print_blob=True)

# ----------------------------------------------------------------------------- mutations

NASTY = ["", ".", "..", "../x.safetensors", "/etc/passwd", "a/b", "config.json", "\x00",
         "model-00001-of-00002.safetensors", "en", "id", "zh", "default", "f16", "q8_0",
         "F32", "BF16", "__metadata__", "~nobody/x", "~", "lens-delta", "1e20", "NaN"]
LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
                 st.text(max_size=12), st.sampled_from(NASTY))
JSONISH = st.recursive(LEAF, lambda c: st.lists(c, max_size=3)
                       | st.dictionaries(st.text(max_size=6) | st.sampled_from(NASTY), c,
                                         max_size=3), max_leaves=8)


def _slots(obj: Any, path: tuple = ()) -> list[tuple]:
    """Every path to a value inside nested dicts and lists (the root is ``()``)."""
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _slots(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _slots(v, (*path, i))
    return out


def _swaps(v: Any) -> list[Any]:
    """Values of other types in place of ``v`` (the mistakes people and tools make)."""
    if isinstance(v, bool):
        return [int(v), str(v).lower(), "yes", None]
    if isinstance(v, int):
        return [str(v), float(v), -v, v * 10**18, True, [v], 0.5]
    if isinstance(v, float):
        return [str(v), int(v) if v == v and abs(v) < 1e300 else 0, float("nan"),
                float("inf"), -v, [v]]
    if isinstance(v, str):
        return [len(v), [v], {v: v}, True, None, 1.5, v * 50, v.upper(), v + "\x00"]
    if isinstance(v, list):
        return [", ".join(map(str, v)), v[:1], v * 2, {}, [], [v]]
    if isinstance(v, dict):
        return [list(v), str(v), {}, None, [v]]
    return [0, "", [], {}]


def _get(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


@st.composite
def mutated(draw, base: Any, keys: list[str]) -> Any:
    """``base`` after 1-4 random edits: delete, replace, insert a key, swap a value's type."""
    obj = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_slots(obj)))
        op = draw(st.sampled_from(["delete", "replace", "insert", "swap"]))
        value = _get(obj, path)
        if op == "insert" and isinstance(value, dict | list):
            new = draw(JSONISH)
            if isinstance(value, dict):
                value[draw(st.sampled_from(keys) | st.text(max_size=8))] = new
            else:
                value.insert(draw(st.integers(0, len(value))), new)
            continue
        if op == "delete" and path:
            parent = _get(obj, path[:-1])
            del parent[path[-1]]
            continue
        new = draw(st.sampled_from(_swaps(value))) if op == "swap" else draw(JSONISH)
        if not path:
            obj = new
        else:
            _get(obj, path[:-1])[path[-1]] = new
    return obj


@st.composite
def byte_mutated(draw, raw: bytes) -> bytes:
    """``raw`` after 1-4 byte edits: overwrite, insert, delete a run, truncate."""
    b = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, len(b)))
        if op == "set" and pos < len(b):
            b[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del b[pos:pos + draw(st.integers(1, 16))]
        else:
            del b[pos:]
    return bytes(b)


def _keys(obj: Any) -> list[str]:
    return sorted({k for p in _slots(obj) for k in p if isinstance(k, str)}) or ["x"]


def _only_lens_errors(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a ``LensMergeError`` is a clean refusal, anything else fails the test."""
    try:
        out = fn()
    except LensMergeError as exc:
        assert str(exc).strip() and "\n" not in str(exc), "not one line of message"
        event(f"refused: {type(exc).__name__}")
        return None
    event("accepted")
    return out


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A scratch directory that is also the working directory (recipes name relative paths)."""
    d = tmp_path_factory.mktemp("fuzz")
    old = Path.cwd()
    os.chdir(d)
    yield d
    os.chdir(old)


def _tiny_tensors() -> dict[str, np.ndarray]:
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
            "h": np.ones(4, dtype=np.float16), "i": np.array([1, 2], dtype=np.int64),
            "b": np.array([True, False]), "e": np.zeros((0, 2), dtype=np.float32)}


# ----------------------------------------------------------------------------- recipes

_RECIPE = yaml.safe_load(DEFAULT_YAML)


def _dump_yaml(obj: Any) -> bytes:
    try:
        return yaml.safe_dump(obj, allow_unicode=True, sort_keys=False).encode("utf-8")
    except (yaml.YAMLError, UnicodeEncodeError):
        return b"name: [unrepresentable\n"


@FUZZ
@given(raw=st.one_of(mutated(_RECIPE, _keys(_RECIPE)).map(_dump_yaml),
                     byte_mutated(DEFAULT_YAML)))
def test_fuzz_recipe_yaml(work, raw):
    p = work / "recipe.yaml"
    p.write_bytes(raw)
    recipe = _only_lens_errors(lambda: load_recipe(p))
    if recipe is not None:
        _only_lens_errors(lambda: check_recipe(recipe))


# ----------------------------------------------------------------------------- deltas


@pytest.fixture(scope="module")
def delta_dir(work) -> Path:
    d = work / "delta"
    d.mkdir()
    save_file({"w": np.ones((2, 3), np.float32), "v": np.full(4, 0.5, np.float32)},
              str(d / "lens_delta.safetensors"), metadata={"format": "lens-delta"})
    return d


_META = {"format": "lens-delta", "format_version": 1, "languages": ["en", "zh"], "top_k": 2,
         "base": {"ref": "default"}, "tool": {"name": "lens-merge"},
         "created": "2025-01-01T00:00:00Z",
         "tensors": {"w": {"shape": [2, 3], "base_dtype": "float32", "base_sha256": "a" * 64},
                     "v": {"shape": [4], "base_dtype": "float32", "base_sha256": "b" * 64}}}
_META_BYTES = json.dumps(_META, indent=1).encode()


@FUZZ
@given(raw=st.one_of(mutated(_META, _keys(_META)).map(lambda o: json.dumps(o).encode()),
                     byte_mutated(_META_BYTES)))
def test_fuzz_delta_json(delta_dir, raw):
    from lens_merge.weights.delta import LensDelta

    (delta_dir / "lens_delta.json").write_bytes(raw)
    d = _only_lens_errors(lambda: LensDelta.load(delta_dir))
    if d is not None:
        assert sorted(d.names) == ["v", "w"]


def test_the_unmutated_delta_loads(delta_dir):
    from lens_merge.weights.delta import LensDelta

    (delta_dir / "lens_delta.json").write_bytes(_META_BYTES)
    assert sorted(LensDelta.load(delta_dir).names) == ["v", "w"]


# ----------------------------------------------------------------------------- safetensors


def _valid_file(tmp: Path) -> bytes:
    p = tmp / "valid.safetensors"
    save_file(_tiny_tensors(), str(p), metadata={"format": "pt"})
    return p.read_bytes()


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


SAME_SIZE = [["F32", "I32", "U32"], ["F16", "BF16", "I16", "U16"],
             ["U8", "I8", "BOOL", "F8_E4M3", "F8_E5M2"], ["F64", "I64", "U64"]]


@st.composite
def benign_header(draw, header: dict) -> dict:
    """Edits that keep a header valid: another dtype of the same size, renamed tensors,
    other metadata (what the checker must accept and safetensors must read)."""
    h = copy.deepcopy(header)
    names = sorted(k for k in h if k != "__metadata__")
    for name in draw(st.lists(st.sampled_from(names), max_size=3)):
        if name in h:
            group = next(g for g in SAME_SIZE if h[name]["dtype"] in g)
            h[name]["dtype"] = draw(st.sampled_from(group))
            if draw(st.booleans()):
                h[draw(st.text(min_size=1, max_size=10))] = h.pop(name)
    if draw(st.booleans()):
        h["__metadata__"] = draw(st.dictionaries(st.text(max_size=8), st.text(max_size=8),
                                                 max_size=3))
    return h


@st.composite
def safetensors_files(draw, raw: bytes) -> bytes:
    header, data = _split(raw)
    kind = draw(st.sampled_from(["benign", "header", "bytes", "truncate"]))
    if kind == "benign":
        body = json.dumps(draw(benign_header(header))).encode()
        body += b" " * draw(st.integers(0, 9))  # writers pad the header with spaces
        return struct.pack("<Q", len(body)) + body + data
    if kind == "header":
        h = draw(mutated(header, _keys(header)))
        body = json.dumps(h).encode()
        if draw(st.booleans()):
            data = data[:draw(st.integers(0, len(data)))]
        return struct.pack("<Q", len(body)) + body + data
    if kind == "bytes":
        return draw(byte_mutated(raw))
    return raw[:draw(st.integers(0, len(raw)))]


_VALID_ST = _valid_file(Path(__import__("tempfile").mkdtemp()))


def _read_back(p: Path, entries: dict) -> None:
    """What the checker accepted, the safetensors library reads, with the same shapes."""
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as fh:
        assert sorted(fh.keys()) == sorted(entries)
        for name, e in entries.items():
            assert tuple(fh.get_tensor(name).shape) == e.shape


@FUZZ
@given(raw=safetensors_files(_VALID_ST))
def test_fuzz_safetensors_headers(work, raw):
    p = work / "shard.safetensors"
    p.write_bytes(raw)
    entries = _only_lens_errors(lambda: check_shard(p))
    if entries is not None:
        _read_back(p, entries)


# ----------------------------------------------------------------------------- index files


@pytest.fixture(scope="module")
def checkpoint(work) -> Path:
    d = work / "ckpt"
    d.mkdir()
    wm = {}
    for i in (1, 2):
        name = f"model-0000{i}-of-00002.safetensors"
        save_file({f"l{i}.weight": np.full((2, 2), i, np.float32),
                   f"l{i}.bias": np.zeros(2, np.float32)}, str(d / name))
        wm |= {f"l{i}.weight": name, f"l{i}.bias": name}
    (d / "config.json").write_text("{}")
    return d


_INDEX = {"metadata": {"total_size": 48},
          "weight_map": {"l1.weight": "model-00001-of-00002.safetensors",
                         "l1.bias": "model-00001-of-00002.safetensors",
                         "l2.weight": "model-00002-of-00002.safetensors",
                         "l2.bias": "model-00002-of-00002.safetensors"}}
_INDEX_BYTES = json.dumps(_INDEX, indent=2).encode()


@FUZZ
@given(raw=st.one_of(mutated(_INDEX, [*_keys(_INDEX), *NASTY])
                     .map(lambda o: json.dumps(o).encode()),
                     byte_mutated(_INDEX_BYTES)))
def test_fuzz_index_files(checkpoint, raw):
    (checkpoint / SAFE_INDEX).write_bytes(raw)
    ck = _only_lens_errors(lambda: Checkpoint.open(checkpoint))
    if ck is not None:
        assert all(s.parent == checkpoint for s in ck.shards)  # nothing outside the directory
        for name in ck.tensor_names():
            assert ck.entry(name).shard.parent == checkpoint
