"""Cached trainer: equivalence with the naive reference-style step, training, the delta."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from lens_merge.architectures import for_config
from lens_merge.config import TrainConfig
from lens_merge.data import load_prompts
from lens_merge.lens.probe import probe
from lens_merge.lens.train.cache import build_cache
from lens_merge.lens.train.loop import _step_losses, train
from lens_merge.lens.train.losses import LossWeights
from lens_merge.lens.train.stack import load_top_stack
from lens_merge.models import load_model, load_tokenizer
from lens_merge.weights.blocks import read_tensors
from lens_merge.weights.checkpoint import Checkpoint, hash_entry
from lens_merge.weights.delta import LensDelta
from tests.oracles.naive_train import naive_losses

LANGS = ["en", "zh", "ja", "bn"]
# accelerate's `--cpu` launcher starts a single process unless mpirun is set up; the torchrun
# launcher (`--multi_gpu`) starts real processes, and the trainer's Accelerator(cpu=True) then
# runs DDP over gloo on the CPU, the same code path as DDP on GPUs.
LAUNCH = ["--multi_gpu"]


@pytest.fixture(scope="module")
def setup(tiny_model):
    path = tiny_model("llama3")
    tok = load_tokenizer(path)
    model = load_model(path)
    texts = load_prompts("default", LANGS, split="train", max_samples=12)
    sub = probe(model, tok, {lang: texts.texts(lang) for lang in LANGS}, batch_size=4)
    return path, tok, sub


@pytest.mark.parametrize("weights", [LossWeights(1.0, 1.0, 1.0, 1.0),
                                     LossWeights(0.0, 2.0, 0.0, 3.0),
                                     LossWeights(0.5, 0.0, 1.5, 1.0)])
def test_cached_step_equals_naive_full_forward(setup, weights):
    path, tok, sub = setup
    rows = load_prompts("default", LANGS, split="train", max_samples=3)
    top_k = 2
    naive_model = load_model(path)
    ref_model = copy.deepcopy(naive_model)
    first = naive_model.config.num_hidden_layers - top_k
    for n, p in naive_model.named_parameters():
        p.requires_grad_(any(n.startswith(f"model.layers.{b}.")
                             for b in range(first, first + top_k)))
    naive = naive_losses(naive_model, ref_model, tok, list(rows.rows), LANGS, sub, weights, 64)
    naive["loss"].backward()

    cache = build_cache(path, tok, rows, top_k, 64, batch_size=2)
    stack, _ = load_top_stack(path, top_k)
    deltas = torch.stack([sub.delta_of(lang) for lang in LANGS[1:]])
    cached = _step_losses(stack, cache.collate([0, 1, 2]), len(LANGS), sub.layer(-1), deltas,
                          weights, "cpu")
    cached["loss"].backward()

    for k in ("loss", "retain", "separate", "align"):
        got, want = float(cached[k].detach()), float(naive[k].detach())
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), k
    assert float(naive["loss"].detach()) > 0
    n_checked = 0
    for i in range(top_k):
        a = dict(stack.layers[i].named_parameters())
        b = dict(naive_model.model.layers[first + i].named_parameters())
        for name in a:
            ga, gb = a[name].grad, b[name].grad
            if weights.retain == 0 and weights.align == 0 and ga is None:
                continue
            scale = max(float(gb.abs().max()), 1e-12)
            assert float((ga - gb).abs().max()) / scale < 1e-5, name
            n_checked += 1
    assert n_checked >= 9


def _cfg(**kw):
    base = dict(top_k=2, lr=3e-3, epochs=2, batch_size=2, grad_accum=1, warmup_ratio=0.0,
                seed=0, max_grad_norm=None)
    return TrainConfig(**(base | kw))


def test_training_moves_targets_and_writes_a_proper_delta(setup, tmp_path):
    path, tok, sub = setup
    prompts = load_prompts("default", LANGS, split="train", max_samples=8)
    res = train(path, sub, prompts, _cfg(), tmp_path / "work", max_length=64, base_ref="tiny")
    log = [json.loads(x) for x in res.log_path.read_text().splitlines()]
    assert len(log) == res.steps == 8
    assert {"loss", "retain", "separate", "align", "lr", "step"} <= set(log[0])
    assert log[-1]["separate"] < log[0]["separate"]
    delta = res.delta
    n = 4
    blocks = {for_config(json.loads((path / "config.json").read_text())).block_of(k)
              for k in delta.names}
    assert blocks == {n - 2, n - 1}
    ck = Checkpoint.open(path)
    expected = {k for k in ck.tensor_names() if k.startswith(("model.layers.2.",
                                                               "model.layers.3."))}
    assert set(delta.names) == expected
    for k in delta.names:
        assert delta.base_hash(k) == hash_entry(ck.entry(k))
    assert any(float(t.abs().max()) > 0 for t in delta.tensors.values())
    assert delta.meta["languages"] == LANGS and delta.meta["top_k"] == 2
    assert delta.meta["final_losses"]["loss"] == pytest.approx(log[-1]["loss"])
    out = delta.save(tmp_path / "delta")
    back = LensDelta.load(out)
    assert back.meta["format_version"] == 1 and back.meta["tool"]["name"] == "lens-merge"
    assert all(torch.equal(back.tensors[k], delta.tensors[k]) for k in delta.names)
    # the cache is reused by a run with other loss weights
    res2 = train(path, sub, prompts, _cfg(lambda_align=0.0, epochs=1), tmp_path / "work",
                 max_length=64)
    assert res2.cache_reused and res2.cache_path == res.cache_path
    assert res2.final_losses["align"] >= 0


def test_zero_weights_are_allowed(setup, tmp_path):
    path, _, sub = setup
    prompts = load_prompts("default", LANGS, split="train", max_samples=4)
    res = train(path, sub, prompts, _cfg(lambda_retain=0, lambda_align=0, epochs=1),
                tmp_path / "w", max_length=64)
    assert res.steps == 2 and res.final_losses["separate"] > 0


def test_accelerate_launch_two_processes_matches_one(setup, tmp_path):
    """`accelerate launch --cpu --num_processes 2` runs the trainer unchanged (DDP on CPU)."""
    path, _, sub = setup
    sub.save(tmp_path / "sub")
    recipe = tmp_path / "r.yaml"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def launch(nproc, bs, out):
        recipe.write_text(
            f"name: t\nbase: {path}\nlanguages: [{', '.join(LANGS)}]\n"
            "data: {max_length: 64, max_train_samples: 8}\n"
            f"train: {{top_k: 2, lr: 0.003, epochs: 1, batch_size: {bs}, grad_accum: 1, "
            "warmup_ratio: 0.0, max_grad_norm: null}\n")
        cmd = [sys.executable, "-m", "accelerate.commands.launch",
               *(LAUNCH if nproc > 1 else ["--cpu"]),
               "--num_processes", str(nproc), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "lens_merge.cli", "train", "--recipe",
               str(recipe), "--subspace", str(tmp_path / "sub"), "--out", str(out),
               "--work-dir", str(tmp_path / f"work{nproc}")]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return LensDelta.load(out)

    two = launch(2, 1, tmp_path / "d2")
    assert two.meta["hyperparameters"]["num_processes"] == 2
    one = launch(1, 2, tmp_path / "d1")
    assert one.meta["hyperparameters"]["num_processes"] == 1
    assert two.meta["hyperparameters"]["optimizer_steps"] == 4
    # relative to the trained weights (norms): Adam's normalisation turns the last-bit
    # differences of DDP's gradient average into +-lr steps where a gradient is near zero,
    # as it did before the cache was sharded (largest single element: ~1e-6 here)
    base = read_tensors(path, one.names, torch.float32)
    _assert_same_delta(two, one, base)
    # each process built one shard of the rows: those its loader visits, and only those
    shards, read = _shards_and_reads(tmp_path / "work2")
    assert sorted(shards) == [0, 1] and len(shards[0]) == len(shards[1]) == 4
    assert sorted(shards[0] + shards[1]) == list(range(8))
    assert read == {r: sorted(rows) for r, rows in shards.items()}
    shards1, read1 = _shards_and_reads(tmp_path / "work1")
    assert shards1 == {0: list(range(8))} and read1 == {0: list(range(8))}
    # a cache built by two processes serves one process (and gives its delta)
    prompts = load_prompts("default", LANGS, split="train", max_samples=8)
    again = train(path, sub, prompts, _cfg(epochs=1), tmp_path / "work2", max_length=64)
    assert again.cache_reused and again.cache_rows == []
    _assert_same_delta(again.delta, one, base)


def _assert_same_delta(got: LensDelta, want: LensDelta, base: dict[str, torch.Tensor]) -> None:
    assert set(got.names) == set(want.names)
    for k in want.names:
        a, b = got.tensors[k], want.tensors[k]
        assert float((a - b).norm() / (base[k] + b).norm()) <= 1e-5, k
        assert torch.allclose(a, b, rtol=0, atol=1e-5), k


def _shards_and_reads(work) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """Per process: the rows of the shard it built (checked against the file's own ``rows``
    tensor), and the rows it read in training (``cache_rows`` of the train log)."""
    from safetensors import safe_open

    (folder,) = [p for p in (work / "cache").iterdir()]
    meta = json.loads((folder / "cache.json").read_text())
    assert meta["format_version"] == 1 and meta["languages"] == LANGS and meta["n_rows"] == 8
    shards = {}
    for sh in meta["shards"]:
        with safe_open(str(folder / sh["file"]), framework="pt") as f:
            assert f.get_tensor("rows").tolist() == sh["rows"]
            assert set(f.keys()) == {"rows", "ref_last", "ref_mean_en",
                                     *(f"{t}.{lang}" for t in ("x", "offsets") for lang in LANGS)}
        shards[sh["rank"]] = sh["rows"]
    log = [json.loads(x) for x in (work / "train_log.jsonl").read_text().splitlines()]
    read: dict[int, list[int]] = {}
    for rec in log:
        for r, rows in enumerate(rec["cache_rows"]):
            read.setdefault(r, []).extend(rows)
    return shards, {r: sorted(rows) for r, rows in read.items()}


def test_disk_cache_collates_as_the_built_cache(setup, tmp_path):
    """The mapped shards give the in-memory cache's batches bit for bit, whatever the shards."""
    from lens_merge.lens.train.cache import LensCache
    from lens_merge.lens.train.store import DiskCache, Shard, shard_name, write_meta, write_shard

    path, tok, _ = setup
    rows = load_prompts("default", LANGS, split="train", max_samples=6)
    cache = build_cache(path, tok, rows, 2, 64, batch_size=4)
    cache.save(tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "cache.json", shard_name(0, 1)]
    split = tmp_path / "two"
    split.mkdir()
    parts = [[4, 1, 5], [0, 3, 2]]
    for r, ids in enumerate(parts):
        part = LensCache(LANGS, cache.first_block, {lang: [cache.x[lang][i] for i in ids]
                                                    for lang in LANGS},
                         cache.ref_last[ids], cache.ref_mean_en[ids], cache.meta, ids)
        write_shard(part, split / shard_name(r, 2))
    write_meta(split, cache, 6, [Shard(file=shard_name(r, 2), rows=ids, rank=r)
                                 for r, ids in enumerate(parts)])
    for folder in ("one", "two"):
        disk = DiskCache(tmp_path / folder)
        assert len(disk) == 6 and disk.first_block == cache.first_block
        for idx in ([0, 1, 2], [5, 0], [3]):
            want, got = cache.collate(idx), disk.collate(idx)
            assert want.keys() == got.keys()
            for k in want:
                assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
