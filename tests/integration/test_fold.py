"""Fold / unfold / verify: equivalence chain per architecture, refusals, provenance, streaming."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import sys
import zlib
from pathlib import Path

import pytest

from lens_merge.errors import DeltaError, FoldError, VerificationError
from lens_merge.files import TEMP_MARK
from lens_merge.models import load_model, load_tokenizer
from lens_merge.records import ParityReport
from lens_merge.testing import TINY_CONFIGS, build_random_model, random_delta
from lens_merge.weights.checkpoint import (
    SAFE_INDEX,
    Checkpoint,
    hash_entry,
    shard_entries,
    shard_metadata,
)
from lens_merge.weights.delta import LensDelta, apply_delta
from lens_merge.weights.fold import (
    PROVENANCE_FILE,
    FoldReport,
    delta_fingerprint,
    fold,
    unfold,
    verify_fold,
)

FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "phi3", "phi3-longrope", "gemma2"]
LANGS = ["en", "zh", "ja"]


# ----------------------------------------------------------------------------- helpers


def _prompts() -> list[str]:
    """Held-out prompts in three languages (the part files stand in while the data is written)."""
    from lens_merge.data import default_data_path, load_prompts

    src = "default"
    if not default_data_path().is_file():
        src = str(sorted(default_data_path().parent.glob("part*.jsonl"))[0])
    ps = load_prompts(src, LANGS, split="heldout", max_samples=2)
    return [r[lang] for lang in LANGS for r in ps.rows]


def _logits(model, tok, texts):
    import torch

    from lens_merge.lens.hidden import encode

    enc = encode(tok, texts, max_length=48)
    with torch.no_grad():
        out = model(**enc).logits.float()
    return out, enc["attention_mask"].bool()


def _tensor_hashes(root: Path) -> dict[str, str]:
    ck = Checkpoint.open(root)
    return {n: hash_entry(e) for _, ents in ck.entries() for n, e in ents.items()}


def _read(root: Path, name: str):
    from safetensors import safe_open

    ck = Checkpoint.open(root)
    with safe_open(str(root / ck.index[name]), framework="pt") as f:
        return f.get_tensor(name)


def _temps(parent: Path, name: str) -> list[str]:
    """Temporary siblings of ``parent / name`` (lens_merge.files' and any older spelling)."""
    return [p.name for p in parent.iterdir()
            if TEMP_MARK in p.name or p.name.startswith(f".{name}.")]


def _no_leftovers(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    left = _temps(out.parent, out.name)
    assert left == [], f"temporary directories left: {left}"


def _cli(*args) -> int:
    """Run the real console entry point in-process; return its exit code."""
    from lens_merge.cli import main

    old = sys.argv
    sys.argv = ["lens-merge", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old


def _flat(text: str) -> str:
    return " ".join(text.split())


def _scaled_delta(model_dir: Path, top_k: int = 2, rel: float = 0.1, seed: int = 0,
                  trained_dtype: str = "stored") -> LensDelta:
    """A delta as training makes it: dW = W_trained - W_base with W_trained = W * (1 + r).

    ``trained_dtype="stored"`` rounds W_trained to the base dtype (training in that dtype);
    ``"fp32"`` keeps fp32 master weights (the usual mixed-precision case).
    """
    import torch

    ck = Checkpoint.open(model_dir)
    n = ck.config()["num_hidden_layers"]
    g = torch.Generator().manual_seed(seed)
    base, trained, hashes = {}, {}, {}
    for name in ck.tensor_names():
        if not any(f"layers.{b}." in name for b in range(n - top_k, n)):
            continue
        w = _read(model_dir, name)
        r = (torch.rand(w.shape, generator=g) * 2 - 1) * rel
        t = w.float() * (1 + r)
        base[name], hashes[name] = w, hash_entry(ck.entry(name))
        trained[name] = t if trained_dtype == "fp32" else t.to(w.dtype)
    return LensDelta.from_weights(base, trained, hashes, meta={"languages": LANGS})


def _ordered(t):
    """Half-precision bits as integers ordered like the values (for ulp distances)."""
    import torch

    i = t.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i & 0x7FFF), i)


@pytest.fixture(scope="module")
def llama(tiny_model) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llama_delta(llama) -> LensDelta:
    return random_delta(llama, top_k=2, scale=0.02, languages=LANGS)


# ----------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("family", FAMILIES)
def test_equivalence_chain(family, tiny_model, tmp_path):
    """base + delta in memory == folded checkpoint reloaded with plain transformers."""
    base = tiny_model(family)
    base_ck = Checkpoint.open(base)
    assert len(base_ck.shards) >= 2, "fixture must be sharded into several shards"
    delta = random_delta(base, top_k=2, scale=0.05, languages=LANGS)
    if family.startswith("phi3"):
        assert any("qkv_proj" in n for n in delta.names)
        assert any("gate_up_proj" in n for n in delta.names)
    rep = fold(base, delta, tmp_path / "out")
    out = rep.out
    assert isinstance(rep, FoldReport) and rep.changed_tensors == len(delta.names)
    touched = {base_ck.index[n] for n in delta.names}
    assert set(rep.rewritten) == touched
    assert set(rep.copied) == {s.name for s in base_ck.shards} - touched
    assert rep.max_cast_error == 0.0

    texts = _prompts()
    tok = load_tokenizer(out)
    ref = load_model(base, "fp32")
    before, _ = _logits(ref, tok, texts)
    apply_delta(ref, delta)
    want, mask = _logits(ref, tok, texts)
    new = load_model(out, "fp32")
    got, _ = _logits(new, tok, texts)
    diff = float((want - got).abs()[mask].max())
    assert diff <= 1e-5, f"{family}: folded logits differ by {diff}"
    assert float((want - before).abs()[mask].max()) > 1e-3, "the delta must change the logits"

    # Byte-level: copied shards identical; unchanged tensors identical; changed = cast(W + dW).
    for s in rep.copied:
        assert filecmp.cmp(base / s, out / s, shallow=False)
    base_h, out_h = _tensor_hashes(base), _tensor_hashes(out)
    assert set(base_h) == set(out_h)
    assert all(base_h[n] == out_h[n] for n in base_h if n not in delta.tensors)
    assert all(base_h[n] != out_h[n] for n in delta.tensors)
    name = delta.names[0]
    assert _read(out, name).equal(_read(base, name) + delta.tensors[name])
    idx_base = json.loads((base / SAFE_INDEX).read_text())
    idx_out = json.loads((out / SAFE_INDEX).read_text())
    assert idx_out["weight_map"] == idx_base["weight_map"]
    assert idx_out["metadata"]["total_size"] == idx_base["metadata"]["total_size"]
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (base / f).is_file():
            assert filecmp.cmp(base / f, out / f, shallow=False), f

    if TINY_CONFIGS[family]["tie_word_embeddings"]:
        assert "lm_head.weight" not in idx_out["weight_map"]
        assert new.lm_head.weight.data_ptr() == new.model.embed_tokens.weight.data_ptr()


def test_bf16_stays_bf16(tiny_model, tmp_path):
    import torch

    base = tiny_model("llama", "bf16")
    delta = random_delta(base, top_k=2, scale=0.02)
    rep = fold(base, delta, tmp_path / "out")
    dtypes = {e.dtype for _, ents in Checkpoint.open(rep.out).entries() for e in ents.values()}
    assert dtypes == {"BF16"}
    # the reported cast error is the true largest |bf16(W + dW) - (W + dW)|
    worst = 0.0
    for n, d in delta.tensors.items():
        exact = _read(base, n).float() + d
        worst = max(worst, float((_read(rep.out, n).float() - exact).abs().max()))
        assert _read(rep.out, n).equal(exact.to(torch.bfloat16))
    assert rep.max_cast_error == worst and worst > 0
    ref = load_model(base, None)
    apply_delta(ref, delta)
    new = load_model(rep.out, None)
    assert next(new.parameters()).dtype == torch.bfloat16
    tok = load_tokenizer(rep.out)
    a, mask = _logits(ref, tok, _prompts())
    b, _ = _logits(new, tok, _prompts())
    assert float((a - b).abs()[mask].max()) == 0.0


def test_single_file_checkpoint(tiny_tokenizer_dir, tmp_path):
    base = build_random_model(TINY_CONFIGS["qwen2"], tmp_path / "base", max_shard_size="1GB",
                              tokenizer_from=tiny_tokenizer_dir)
    assert not (base / SAFE_INDEX).exists()
    delta = random_delta(base, top_k=1)
    rep = fold(base, delta, tmp_path / "out")
    assert rep.rewritten == ["model.safetensors"] and not (rep.out / SAFE_INDEX).exists()
    name = delta.names[0]
    assert _read(rep.out, name).equal(_read(base, name) + delta.tensors[name])


# ----------------------------------------------------------------------------- unfold


def test_unfold_fp32_bit_exact(llama, tmp_path):
    delta = _scaled_delta(llama)
    folded = fold(llama, delta, tmp_path / "folded").out
    assert _tensor_hashes(folded) != _tensor_hashes(llama)
    rep = unfold(folded, delta, tmp_path / "base2")
    assert rep.hashes_checked and rep.restored_exact == sorted(delta.names)
    assert _tensor_hashes(rep.out) == _tensor_hashes(llama)
    prov = json.loads((rep.out / PROVENANCE_FILE).read_text())
    assert prov["operation"] == "unfold" and prov["previous"]["operation"] == "fold"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_unfold_half_within_one_ulp(dtype, tiny_model, tmp_path):
    base = tiny_model("llama", dtype)
    delta = _scaled_delta(base, trained_dtype="fp32")  # fp32 master weights: not exact
    folded = fold(base, delta, tmp_path / "folded").out
    back = unfold(folded, delta, tmp_path / "back").out
    worst, exact, total = 0, 0, 0
    for n in delta.names:
        a, b = _ordered(_read(base, n)), _ordered(_read(back, n))
        dist = (a - b).abs()
        worst = max(worst, int(dist.max()))
        exact += int((dist == 0).sum())
        total += dist.numel()
    assert worst <= 1, f"{dtype}: unfold is {worst} ulp from the base"
    assert exact / total > 0.9
    unchanged = {n: h for n, h in _tensor_hashes(base).items() if n not in delta.tensors}
    assert all(_tensor_hashes(back)[n] == h for n, h in unchanged.items())


def test_unfold_refuses_other_delta(llama, llama_delta, tmp_path):
    folded = fold(llama, llama_delta, tmp_path / "folded").out
    other = random_delta(llama, top_k=2, scale=0.02, seed=1)
    with pytest.raises(DeltaError, match="folded with the delta of fingerprint"):
        unfold(folded, other, tmp_path / "back")
    _no_leftovers(tmp_path / "back")


def test_unfold_refuses_modified_folded(llama, llama_delta, tmp_path):
    folded = fold(llama, llama_delta, tmp_path / "folded").out
    e = Checkpoint.open(folded).entry(llama_delta.names[0])
    with open(e.shard, "r+b") as fh:
        fh.seek(e.begin)
        b = fh.read(1)
        fh.seek(e.begin)
        fh.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(DeltaError, match=rf"{llama_delta.names[0]}.*crc32"):
        unfold(folded, llama_delta, tmp_path / "back")
    _no_leftovers(tmp_path / "back")


# ----------------------------------------------------------------------------- refusals


def test_refuses_wrong_base(llama, llama_delta, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")
    wrong = tmp_path / "wrong"
    shutil.copytree(llama, wrong)
    name = llama_delta.names[-1]
    e = Checkpoint.open(wrong).entry(name)
    with open(e.shard, "r+b") as fh:  # flip one byte of one changed tensor
        fh.seek(e.begin + 5)
        b = fh.read(1)
        fh.seek(e.begin + 5)
        fh.write(bytes([b[0] ^ 0xFF]))
    delta_dir = llama_delta.save(tmp_path / "delta")
    out = tmp_path / "out"
    assert _cli("fold", wrong, delta_dir, "-o", out) == 1
    msg = _flat(capsys.readouterr().err)
    assert name in msg and hash_entry(e) in msg and llama_delta.base_hash(name) in msg
    _no_leftovers(out)


def test_refuses_missing_tensor(llama, llama_delta, tmp_path):
    import torch

    d = LensDelta(dict(llama_delta.tensors), json.loads(json.dumps(llama_delta.meta)))
    d.tensors["model.layers.99.mlp.up_proj.weight"] = torch.zeros(2, 2)
    with pytest.raises(DeltaError, match=r"model\.layers\.99\.mlp\.up_proj\.weight"):
        fold(llama, d, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_refuses_tied_lm_head(tiny_model, tmp_path):
    import torch

    # a tied config whose checkpoint stores lm_head anyway must not take a delta on it
    base = tmp_path / "base"
    shutil.copytree(tiny_model("mistral"), base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (base / "config.json").write_text(json.dumps(cfg))
    e = Checkpoint.open(base).entry("lm_head.weight")
    d = LensDelta({"lm_head.weight": torch.zeros(e.shape)},
                  {"tensors": {"lm_head.weight": {"base_sha256": hash_entry(e)}}})
    with pytest.raises(FoldError, match="ties it to the input embeddings"):
        fold(base, d, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def _pickle_checkpoint(src: Path, dest: Path) -> Path:
    """The same weights saved the old way: pytorch_model-*.bin shards + index."""
    import torch
    from safetensors.torch import load_file

    dest.mkdir()
    ck = Checkpoint.open(src)
    wm = {}
    for shard in ck.shards:
        name = shard.name.replace("model", "pytorch_model", 1).replace(".safetensors", ".bin")
        state = load_file(str(shard))
        torch.save(state, dest / name)
        wm.update({k: name for k in state})
    (dest / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {},
                                                                   "weight_map": wm}))
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != SAFE_INDEX:
            shutil.copy2(f, dest / f.name)
    return dest


def test_pickle_refused_then_allowed(llama, llama_delta, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")
    pk = _pickle_checkpoint(llama, tmp_path / "pickle")
    delta_dir = llama_delta.save(tmp_path / "delta")
    out = tmp_path / "out"
    assert _cli("fold", pk, delta_dir, "-o", out) == 1
    msg = _flat(capsys.readouterr().err)
    assert "pickle" in msg and "--allow-pickle" in msg
    _no_leftovers(out)

    assert _cli("fold", pk, delta_dir, "-o", out, "--allow-pickle") == 0
    assert "pickle, converted to safetensors" in _flat(capsys.readouterr().out)
    assert not list(out.glob("*.bin")) and (out / SAFE_INDEX).is_file()
    reference = fold(llama, llama_delta, tmp_path / "ref").out
    assert _tensor_hashes(out) == _tensor_hashes(reference)
    assert shard_metadata(out / Checkpoint.open(out).index[llama_delta.names[0]])["format"] == "pt"


def test_refuses_nan_delta(llama, llama_delta, tmp_path):
    d = LensDelta({k: v.clone() for k, v in llama_delta.tensors.items()}, llama_delta.meta)
    victim = [n for n in d.names if d.tensors[n].ndim == 2][1]
    d.tensors[victim][0, 0] = float("nan")
    with pytest.raises(FoldError, match=rf"{victim}.*NaN"):
        fold(llama, d, tmp_path / "out")
    _no_leftovers(tmp_path / "out")


def test_refuses_overflow_to_inf(tiny_model, tmp_path, capsys, monkeypatch):
    """fp16 W + dW beyond 65504 becomes Inf: found mid-shard, nothing is left behind."""
    monkeypatch.setenv("COLUMNS", "500")
    base = tiny_model("llama", "fp16")
    d = random_delta(base, top_k=2, scale=0.01)
    matrices = [n for n in d.names if d.tensors[n].ndim == 2]
    victim = sorted(matrices, key=lambda n: Checkpoint.open(base).entry(n).begin)[-1]
    d.tensors[victim][0, 0] = 1e6
    out = tmp_path / "out"
    assert _cli("fold", base, d.save(tmp_path / "delta"), "-o", out) == 1
    msg = _flat(capsys.readouterr().err)
    assert victim in msg and "NaN/Inf" in msg and "float16" in msg
    _no_leftovers(out)


def test_existing_out_needs_overwrite(llama, llama_delta, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    delta_dir = llama_delta.save(tmp_path / "delta")
    assert _cli("fold", llama, delta_dir, "-o", out) == 1
    msg = _flat(capsys.readouterr().err)
    assert "exists" in msg and "--overwrite" in msg
    assert (out / "keep.txt").read_text() == "mine"
    assert _temps(tmp_path, "out") == []
    assert _cli("fold", llama, delta_dir, "-o", out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / PROVENANCE_FILE).is_file()


def test_existing_out_message(llama, llama_delta, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FoldError, match=r"exists; pass --overwrite"):
        fold(llama, llama_delta, tmp_path / "out")


def test_refuses_out_equal_base(llama, llama_delta, tmp_path):
    from lens_merge.errors import OutputError

    before = {p.name: p.read_bytes() for p in llama.iterdir()}
    with pytest.raises(OutputError, match="is the base checkpoint"):
        fold(llama, llama_delta, llama, overwrite=True)
    with pytest.raises(OutputError, match="lies inside the base checkpoint"):
        fold(llama, llama_delta, llama / "sub", overwrite=True)
    with pytest.raises(OutputError, match="contains the base checkpoint"):
        fold(llama, llama_delta, llama.parent, overwrite=True)
    saved = llama_delta.save(tmp_path / "delta")
    with pytest.raises(OutputError, match="is the delta"):
        fold(llama, LensDelta.load(saved), saved, overwrite=True)
    assert {p.name: p.read_bytes() for p in llama.iterdir()} == before


def test_truncated_untouched_shard_is_named(llama, llama_delta, tmp_path):
    """Issue 11: a shard the delta does not touch, truncated, used to be copied as is."""
    from lens_merge.errors import ModelError

    base = Path(shutil.copytree(llama, tmp_path / "base"))
    touched = {Checkpoint.open(base).index[n] for n in llama_delta.names}
    victim = next(s for s in sorted(base.glob("model-*.safetensors")) if s.name not in touched)
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size - 100)
    with pytest.raises(ModelError, match=rf"{victim.name}: truncated: header promises"):
        fold(base, llama_delta, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupted_write_leaves_nothing(llama, llama_delta, tmp_path, monkeypatch, exc):
    """A failure mid-shard (after the first shard was written) leaves no OUT and no temp dir;
    an existing OUT being overwritten survives untouched."""
    from lens_merge.weights.shard_writer import ShardWriter

    calls = {"n": 0}
    real_write = ShardWriter.write

    def flaky(self, name, data):
        calls["n"] += 1
        if calls["n"] == 2:  # second changed tensor: earlier shards and tensors are written
            raise exc("simulated failure mid-shard")
        return real_write(self, name, data)

    monkeypatch.setattr(ShardWriter, "write", flaky)
    by_shard = {}
    for n in llama_delta.names:
        by_shard.setdefault(Checkpoint.open(llama).index[n], []).append(n)
    assert any(len(v) >= 2 for v in by_shard.values())
    out = tmp_path / "out"
    with pytest.raises(exc, match="simulated"):
        fold(llama, llama_delta, out)
    _no_leftovers(out)

    calls["n"] = 0
    out.mkdir()
    (out / "old.txt").write_text("previous fold")
    with pytest.raises(exc):
        fold(llama, llama_delta, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert _temps(tmp_path, "out") == []


# ----------------------------------------------------------------------------- files, links


def test_other_files_travel_and_provenance(llama, llama_delta, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(llama, base)
    (base / "chat_template.jinja").write_text("{{ messages }}")
    (base / "notes").mkdir()
    (base / "notes" / "readme.txt").write_text("hello")
    (base / "original").mkdir()
    (base / "original" / "consolidated.00.pth").write_bytes(b"stale weights")
    rep = fold(base, llama_delta, tmp_path / "out")
    out = rep.out
    for f in ("chat_template.jinja", "notes/readme.txt", "config.json", "tokenizer.json"):
        assert (out / f).read_bytes() == (base / f).read_bytes(), f
    assert rep.skipped_files == ["original/consolidated.00.pth"]
    assert not (out / "original" / "consolidated.00.pth").exists()
    prov = json.loads((out / PROVENANCE_FILE).read_text())
    assert prov["operation"] == "fold" and prov["tool"]["name"] == "lens-merge"
    assert prov["delta"]["languages"] == LANGS and prov["delta"]["tensors"] == json.loads(
        json.dumps(llama_delta.meta["tensors"]))
    assert "folded_at" not in prov  # no wall-clock time unless SOURCE_DATE_EPOCH is set
    assert prov["delta_fingerprint"] == delta_fingerprint(llama_delta)
    for n in llama_delta.names:
        e = Checkpoint.open(out).entry(n)
        with open(e.shard, "rb") as fh:
            fh.seek(e.begin)
            crc = zlib.crc32(fh.read(e.nbytes))
        assert prov["tensors"][n]["out_crc32"] == f"{crc:08x}"
    for s in rep.rewritten:
        meta = shard_metadata(out / s)
        assert meta["format"] == "pt" and meta["lens_merge_operation"] == "fold"
        n_changed = sum(Checkpoint.open(base).index[n] == s for n in llama_delta.names)
        assert meta["lens_merge_changed_tensors"] == str(n_changed) and n_changed > 0
        assert meta["lens_merge_delta_fingerprint"] == prov["delta_fingerprint"]
    for s in rep.copied:
        assert "lens_merge_operation" not in shard_metadata(out / s)


def test_link_hardlinks_unchanged_shards(llama, llama_delta, tmp_path):
    rep = fold(llama, llama_delta, tmp_path / "out", link=True)
    assert rep.linked and not rep.copied
    for s in rep.linked:
        assert os.stat(rep.out / s).st_ino == os.stat(llama / s).st_ino
    for s in rep.rewritten:
        assert os.stat(rep.out / s).st_ino != os.stat(llama / s).st_ino


def test_outputs_have_ordinary_permissions(llama, llama_delta, tmp_path):
    """safetensors and tempfile write 0600/0700; released artifacts follow the umask."""
    import stat

    umask = os.umask(0o022)
    try:
        delta_dir = llama_delta.save(tmp_path / "delta")
        out = fold(llama, delta_dir, tmp_path / "out").out
        base_modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in llama.iterdir()}
        linked = fold(llama, delta_dir, tmp_path / "linked", link=True)
    finally:
        os.umask(umask)
    for root in (delta_dir, out):
        for f in [root, *root.rglob("*")]:
            want = 0o755 if f.is_dir() else 0o644
            assert stat.S_IMODE(f.stat().st_mode) == want, f
    # hardlinked shards share their mode with the base: left untouched
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in llama.iterdir()} == base_modes
    assert linked.linked


def test_rewritten_shard_reads_back(llama, llama_delta, tmp_path):
    """The streamed writer's output is a valid safetensors file for an independent reader."""
    from safetensors import safe_open

    rep = fold(llama, llama_delta, tmp_path / "out")
    for s in rep.rewritten:
        ents = shard_entries(llama / s)
        with safe_open(str(rep.out / s), framework="pt") as f:
            assert list(f.keys()) == sorted(ents)
            for n in ents:
                t = f.get_tensor(n)
                assert tuple(t.shape) == ents[n].shape


# ----------------------------------------------------------------------------- verify


def _limit(rep: ParityReport, name: str) -> float:
    return next(c.limit for c in rep.checks if c.name == name)


def test_verify_passes_and_fails(llama, llama_delta, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")
    folded = fold(llama, llama_delta, tmp_path / "folded").out
    rep = verify_fold(llama, llama_delta, folded)
    assert isinstance(rep, ParityReport) and rep.kind == "fold" and rep.variant == "float32"
    assert rep.passed and rep.problems == [] and rep.metrics["max_abs_logit_diff"] <= 1e-5
    assert rep.metrics["top1_agreement"] == 1.0 == rep.metrics["top1_agreement_all_positions"]
    assert [c.name for c in rep.checks] == ["max_abs_logit_diff"]
    assert _limit(rep, "max_abs_logit_diff") == 1e-4  # THRESHOLDS["fold"]["float32"]
    assert rep.n_prompts == 2 * len(LANGS) and set(rep.per_language) == set(LANGS)
    assert rep.languages == LANGS and rep.subject == str(folded) and rep.verified_at
    assert len(rep.details["prompts"]) == rep.n_prompts and rep.details["base_dtype"] == "float32"
    assert 0 < rep.metrics["n_contexts"] <= rep.metrics["n_positions"]
    assert rep.metrics["n_positions"] == sum(r["n_tokens"] for r in rep.details["prompts"])

    other = random_delta(llama, top_k=2, scale=0.05, seed=3)
    wrong = fold(llama, other, tmp_path / "wrong").out
    with pytest.raises(VerificationError) as ei:
        verify_fold(llama, llama_delta, wrong, prompts=["Hello there", "Bonjour"])
    bad = ei.value.report
    assert isinstance(bad, ParityReport) and bad.passed is False
    assert bad.metrics["max_abs_logit_diff"] > 1e-3 and bad.n_prompts == 2
    assert bad.failures and "max_abs_logit_diff" in bad.failures[0]
    # two short prompts share the chat template's prefix: counted once in the top-1 figure
    assert 0 < bad.metrics["n_contexts"] < bad.metrics["n_positions"]
    assert "max_abs_logit_diff" in str(ei.value)
    # the tolerance argument overrides the table's limit; without raising, the report returns
    loose = verify_fold(llama, llama_delta, wrong, prompts=["Hello there"], tolerance=1e3)
    assert loose.passed and _limit(loose, "max_abs_logit_diff") == 1e3
    strict = verify_fold(llama, llama_delta, wrong, prompts=["Hello there"],
                         raise_on_failure=False)
    assert not strict.passed and strict.variant == "float32"

    delta_dir = llama_delta.save(tmp_path / "delta")
    js = tmp_path / "v.json"
    assert _cli("verify", llama, delta_dir, wrong, "--json", js, "-l", "en") == 1
    assert "verification failed" in _flat(capsys.readouterr().err)
    saved = json.loads(js.read_text())
    assert saved["schema"] == "lens-merge-parity/1" and saved["kind"] == "fold"
    assert saved["passed"] is False and saved["metrics"]["max_abs_logit_diff"] > 1e-3
    assert _cli("verify", llama, delta_dir, folded, "-l", "en,ja") == 0
    out = _flat(capsys.readouterr().out)
    assert "verification passed" in out and "max_abs_logit_diff" in out


def test_verify_dtype_change_is_a_problem(llama, llama_delta, tmp_path):
    """A folded checkpoint saved in another dtype fails even when its logits are close."""
    folded = fold(llama, llama_delta, tmp_path / "folded").out
    half = tmp_path / "half"
    load_model(folded, "fp16").save_pretrained(str(half), safe_serialization=True)
    load_tokenizer(folded).save_pretrained(str(half))
    rep = verify_fold(llama, llama_delta, half, prompts=["Hello there"], tolerance=1e3,
                      raise_on_failure=False)
    assert rep.variant == "float16" and rep.details["base_dtype"] == "float32"
    assert all(c.passed for c in rep.checks) and not rep.passed
    assert rep.problems == ["weights are float16, the base is float32; a fold must keep the "
                            "base dtype"]
    with pytest.raises(VerificationError, match="a fold must keep the base dtype"):
        verify_fold(llama, llama_delta, half, prompts=["Hello there"], tolerance=1e3)


def test_fold_thresholds_can_fail():
    """Every fold limit is a real check: a perfect result passes it, a bad one fails it."""
    from lens_merge.parity.thresholds import THRESHOLDS, checks_for
    from lens_merge.weights.verify import fold_limits

    assert set(THRESHOLDS["fold"]) == {"float32", "float64", "float16", "bfloat16"}
    for dtype, row in THRESHOLDS["fold"].items():
        assert row, dtype
        for name, limit in row.items():
            assert name == "max_abs_logit_diff" and 0 < limit < 1, (dtype, name)
        assert all(c.passed for c in checks_for(row, {"max_abs_logit_diff": 0.0}))
        assert not any(c.passed for c in checks_for(row, {"max_abs_logit_diff": 2 * limit}))
        assert not any(c.passed for c in checks_for(row, {}))  # a missing metric fails
        assert fold_limits(dtype) == (row, [])
        assert fold_limits(dtype, 0.5) == ({"max_abs_logit_diff": 0.5}, [])
    limits, problems = fold_limits("int8")
    assert limits == {} and "no fold parity thresholds for 'int8'" in problems[0]
    assert fold_limits("int8", 0.1) == ({"max_abs_logit_diff": 0.1}, [])


def test_verify_imports_nothing_private_from_fold():
    """verify.py and fold.py no longer import each other's private names (no cycle)."""
    import ast
    import importlib

    import lens_merge.weights.verify as verify

    tree = ast.parse(Path(verify.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "lens_merge.weights.fold" not in imported
    for mod in ("_source", "_tensors", "_report", "_write"):
        m = importlib.import_module(f"lens_merge.weights.{mod}")
        src = ast.parse(Path(m.__file__).read_text())
        deps = {n.module for n in ast.walk(src) if isinstance(n, ast.ImportFrom)}
        assert not deps & {"lens_merge.weights.fold", "lens_merge.weights.verify"}, mod
        assert len(Path(m.__file__).read_text().splitlines()) < 300, mod


# ----------------------------------------------------------------------------- default model


def test_same_inputs_give_byte_identical_outputs(llama, llama_delta, tmp_path, monkeypatch):
    """Two folds and two delta saves of the same inputs are byte-identical (no timestamps);
    SOURCE_DATE_EPOCH stamps a fixed time instead."""
    import hashlib

    def digest(d: Path) -> dict[str, str]:
        return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(d.rglob("*")) if p.is_file()}

    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    a = fold(llama, llama_delta, tmp_path / "a").out
    b = fold(llama, llama_delta, tmp_path / "b").out
    assert digest(a) == digest(b)
    d1 = LensDelta(dict(llama_delta.tensors), dict(llama_delta.meta)).save(tmp_path / "d1")
    d2 = LensDelta(dict(llama_delta.tensors), dict(llama_delta.meta)).save(tmp_path / "d2")
    assert digest(d1) == digest(d2)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    c = fold(llama, llama_delta, tmp_path / "c").out
    prov = json.loads((c / PROVENANCE_FILE).read_text())
    assert prov["folded_at"] == "2023-11-14T22:13:20+00:00"
    assert digest(c) != digest(a)
