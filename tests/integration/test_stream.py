"""The block-streamed frozen pass equals the whole model, for every supported architecture.

The streamed cache (``build_cache``: one block in memory at a time) is compared with the
whole-model cache (``tests/oracles/full_cache.py``: one forward with ``output_hidden_states``),
the streamed probe with the probe of a loaded model, and the trainer's ``TopStack`` (top K
blocks only) with the reference outputs the cache holds.
"""

from __future__ import annotations

import pytest
import torch

from lens_merge.architectures import for_config
from lens_merge.data import load_prompts
from lens_merge.lens.hidden import encode
from lens_merge.lens.probe import probe
from lens_merge.lens.stream import input_scale_of
from lens_merge.lens.train.cache import build_cache
from lens_merge.lens.train.loop import cache_path_for, train
from lens_merge.lens.train.stack import load_top_stack
from lens_merge.models import load_model, load_tokenizer
from lens_merge.testing import TINY_CONFIGS, build_random_model
from lens_merge.weights import blocks
from tests.oracles.full_cache import full_model_cache

LANGS = ["en", "zh", "ja"]
# the tiny configs' sliding windows (512) exceed the prompts: these variants make the
# sliding-window masks matter (Gemma2 alternates them per layer; Mistral uses one for all
# layers; Qwen2 from layer max_window_layers on)
SLIDING = {
    "gemma2-window6": {**TINY_CONFIGS["gemma2"], "sliding_window": 6},
    "mistral-window6": {**TINY_CONFIGS["mistral"], "sliding_window": 6},
    "qwen2-window6": {**TINY_CONFIGS["qwen2"], "use_sliding_window": True,
                      "sliding_window": 6, "max_window_layers": 2},
}
FAMILIES = [*TINY_CONFIGS, *SLIDING]


@pytest.fixture(scope="module")
def model_of(tiny_model, tiny_tokenizer_dir, tmp_path_factory):
    made = {}

    def make(family: str):
        if family in TINY_CONFIGS:
            return tiny_model(family)
        if family not in made:
            made[family] = build_random_model(SLIDING[family],
                                              tmp_path_factory.mktemp(family),
                                              tokenizer_from=tiny_tokenizer_dir)
        return made[family]

    return make


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_cache_equals_full_model_cache(model_of, family):
    path = model_of(family)
    tok = load_tokenizer(path)
    model = load_model(path)
    prompts = load_prompts("default", LANGS, split="train", max_samples=5)
    scale = input_scale_of(model.config, for_config(model.config.to_dict()))
    for top_k in (2, model.config.num_hidden_layers):  # N-K = 2, and the embeddings (0)
        want = full_model_cache(model, tok, prompts, top_k, 128, 2, input_scale=scale)
        got = build_cache(path, tok, prompts, top_k, 128, batch_size=2)
        assert got.first_block == want.first_block
        for lang in LANGS:
            assert len(got.x[lang]) == len(want.x[lang]) == 5
            for a, b in zip(got.x[lang], want.x[lang], strict=True):
                assert _max_diff(a, b) <= 1e-5, (lang, top_k)
        assert _max_diff(got.ref_last, want.ref_last) <= 1e-5
        assert _max_diff(got.ref_mean_en, want.ref_mean_en) <= 1e-5
        assert float(want.ref_last.abs().max()) > 0.1  # not trivially zero


@pytest.mark.parametrize("family", FAMILIES)
def test_top_stack_reproduces_the_reference_outputs(model_of, family):
    """The trainer's stack (top K blocks, final norm, rotary only) on the cached inputs."""
    path = model_of(family)
    prompts = load_prompts("default", LANGS, split="train", max_samples=4)
    cache = build_cache(path, load_tokenizer(path), prompts, 2, 64, batch_size=3)
    stack, model = load_top_stack(path, 2)
    batch = cache.collate([0, 1, 2, 3])
    with torch.no_grad():
        h = stack(batch["x"], batch["mask"])  # [L*B, T, d], language-major
    z = h[:, -1, :].reshape(len(LANGS), 4, -1).transpose(0, 1)
    assert _max_diff(z, batch["ref_last"]) <= 1e-5
    m = batch["mask"][:4].unsqueeze(-1).float()
    assert _max_diff((h[:4] * m).sum(1) / m.sum(1), batch["ref_mean_en"]) <= 1e-5
    # nothing but the top K blocks and the final norm holds weights
    n = model.config.num_hidden_layers
    real = {k for k, p in model.named_parameters() if p.device.type != "meta"}
    top = (f"model.layers.{n - 2}.", f"model.layers.{n - 1}.", "model.norm.")
    assert real and all(k.startswith(top) for k in real)
    assert model.get_input_embeddings().weight.device.type == "meta"
    assert {k for k, _ in stack.named_parameters()} == {
        k.replace(f"model.layers.{n - 2}.", "layers.0.").replace(
            f"model.layers.{n - 1}.", "layers.1.").replace("model.norm.", "norm.")
        for k in real}


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_streamed_probe_equals_loaded_probe(model_of, family):
    path = model_of(family)
    tok = load_tokenizer(path)
    ps = load_prompts("default", LANGS, split="train", max_samples=6)
    texts = {lang: ps.texts(lang) for lang in LANGS}
    streamed = probe(path, tok, texts, batch_size=4, max_length=64)
    loaded = probe(load_model(path), tok, texts, batch_size=4, max_length=64)
    assert len(streamed.layers) == len(loaded.layers) == TINY_CONFIGS[family]["num_hidden_layers"]
    for a, b in zip(streamed.layers, loaded.layers, strict=True):
        torch.testing.assert_close(a.means, b.means, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.deltas, b.deltas, atol=1e-4, rtol=1e-4)


def test_observe_sees_the_hf_hidden_states(model_of):
    """``observe(batch, k, h, mask)`` gets HF ``hidden_states[k]`` at every prompt token for
    k = 0..N (Gemma2: scaled embeddings at 0, the final norm at N), for the batch's rows."""
    path = model_of("gemma2")
    tok = load_tokenizer(path)
    model = load_model(path)
    prompts = load_prompts("default", ["en", "zh"], split="train", max_samples=3)
    seen: dict[tuple[str, int], tuple] = {}

    def observe(batch, k, h, mask):
        assert (batch.lang, k) not in seen  # one batch per language here
        seen[batch.lang, k] = (batch.rows, h.clone(), mask.bool())

    build_cache(path, tok, prompts, 2, 64, batch_size=3, observe=observe)
    n = model.config.num_hidden_layers
    for lang in ("en", "zh"):
        rows, _, mask = seen[lang, 0]
        assert sorted(rows) == [0, 1, 2]
        enc = encode(tok, [prompts.texts(lang)[r] for r in rows], 64)
        assert torch.equal(enc["attention_mask"].bool(), mask)
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True, use_cache=False).hidden_states
        assert len(hs) == n + 1
        for k in range(n + 1):
            assert _max_diff(seen[lang, k][1][mask], hs[k][mask]) <= 1e-5, (lang, k)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma2-window6"])
def test_rows_run_the_shared_prompt_prefix_once(model_of, family):
    """The chat template's system prompt is run once per batch (a window shorter than the
    batch keeps the rows whole), and the rows' states equal the whole rows'."""
    from lens_merge.lens._rows import Rows, attention_kind
    from lens_merge.lens.hidden import encode_batches
    from lens_merge.lens.stream import run_blocks
    from lens_merge.models import empty_model

    path = model_of(family)
    tok, model = load_tokenizer(path), load_model(path)
    prompts = load_prompts("default", ["en", "ja"], split="train", max_samples=4)
    batch = encode_batches(tok, {"ja": prompts.texts("ja")}, 256, 4, by_length=True)[0]
    ids = [r[m.bool()].tolist()
           for r, m in zip(batch.input_ids, batch.attention_mask, strict=True)]
    common = next(i for i in range(len(ids[0])) if len({tuple(r[:i + 1]) for r in ids}) > 1)
    config, decoder = model.config, model.base_model
    kinds = {attention_kind(layer, config) for layer in decoder.layers}
    rows = Rows(batch, config, decoder.rotary_emb, kinds, torch.float32)
    if family.endswith("window6"):
        assert rows.shared == 0
    else:  # "<|im_start|>system ... <|im_start|>user\n"
        assert rows.shared == common >= 20
    assert empty_model(path).config.num_hidden_layers == len(decoder.layers)
    scale = input_scale_of(config, for_config(config.to_dict()))
    with torch.no_grad():
        h = decoder.embed_tokens(batch.input_ids) * torch.tensor(scale)
        rows.start(h)
        for layer in decoder.layers:
            rows.block(layer)
        want = run_blocks(decoder.layers, h, batch.attention_mask, batch.position_ids, config,
                          decoder.rotary_emb)
    m = batch.attention_mask.bool()
    assert _max_diff(rows.hidden()[m], want[m]) <= 1e-5


@pytest.fixture
def loads(monkeypatch):
    """Record every ``BlockLoader`` load and release, and the most parts held at once."""
    log = {"loaded": [], "held": 0, "max_held": 0}
    load, release = blocks.BlockLoader.load, blocks.BlockLoader.release

    def spy_load(self, model, prefix):
        log["loaded"].append(prefix)
        log["held"] += 1
        log["max_held"] = max(log["max_held"], log["held"])
        return load(self, model, prefix)

    def spy_release(self, model, names):
        log["held"] -= 1
        return release(self, model, names)

    monkeypatch.setattr(blocks.BlockLoader, "load", spy_load)
    monkeypatch.setattr(blocks.BlockLoader, "release", spy_release)
    return log


def test_stream_holds_one_part_at_a_time(model_of, loads):
    path = model_of("qwen3")
    prompts = load_prompts("default", LANGS, split="train", max_samples=3)
    build_cache(path, load_tokenizer(path), prompts, 2, 64, batch_size=2)
    n = TINY_CONFIGS["qwen3"]["num_hidden_layers"]
    assert loads["loaded"] == ["model.embed_tokens", *[f"model.layers.{i}" for i in range(n)],
                               "model.norm"]
    assert loads["max_held"] == 1 and loads["held"] == 0


def test_trainer_loads_only_the_top_blocks(model_of, loads, tmp_path):
    from lens_merge.config import TrainConfig
    from lens_merge.lens.probe import Subspace, fit_layers

    path = model_of("llama3")
    tok = load_tokenizer(path)
    prompts = load_prompts("default", LANGS, split="train", max_samples=4)
    cfg = TrainConfig(top_k=2, epochs=1, batch_size=2, grad_accum=1, warmup_ratio=0.0)
    build_cache(path, tok, prompts, 2, 64, cfg.cache_batch_size).save(
        cache_path_for(tmp_path, path, prompts, cfg, 64, True))
    means = torch.randn(4, len(LANGS), 64, generator=torch.Generator().manual_seed(0))
    sub = Subspace(LANGS, fit_layers(means, LANGS, 2), {"num_layers": 4})
    loads["loaded"].clear()
    res = train(path, sub, prompts, cfg, tmp_path, max_length=64, cpu=True)
    assert res.cache_reused
    assert loads["loaded"] == ["model.layers.2", "model.layers.3", "model.norm"]
    assert sorted({n.split(".")[2] for n in res.delta.names}) == ["2", "3"]
