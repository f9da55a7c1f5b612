"""The base's own English replies in the cache, and the reply KL that keeps them."""

from __future__ import annotations

import json

import pytest
import torch

from lens_merge.config import TrainConfig
from lens_merge.data import load_prompts
from lens_merge.lens.hidden import encode
from lens_merge.lens.probe import probe
from lens_merge.lens.train.cache import build_cache
from lens_merge.lens.train.loop import cache_key, train
from lens_merge.lens.train.replies import greedy_replies
from lens_merge.lens.train.store import DiskCache
from lens_merge.models import load_model, load_tokenizer
from lens_merge.weights.delta import apply_delta

LANGS = ["en", "zh", "ja", "bn"]


@pytest.fixture(scope="module")
def setup(tiny_model):
    path = tiny_model("llama3")
    tok = load_tokenizer(path)
    texts = load_prompts("default", LANGS, split="train", max_samples=12)
    sub = probe(load_model(path), tok, {lang: texts.texts(lang) for lang in LANGS},
                batch_size=4)
    return path, tok, sub


def _cfg(**kw):
    base = dict(top_k=2, lr=3e-3, epochs=4, batch_size=2, grad_accum=1, warmup_ratio=0.0,
                seed=0, max_grad_norm=None, separate_scale=8.0, lambda_retain=0.0)
    return TrainConfig(**(base | kw))


def test_cached_reply_stream_is_the_models_own(setup, tmp_path):
    """x_reply is block N-K's input along prompt + the base's greedy reply (without its last
    token), equal to the full model's hidden state there; the reply is what generate gives."""
    path, tok, _ = setup
    rows = load_prompts("default", LANGS, split="train", max_samples=5)
    cache = build_cache(path, tok, rows, 2, 64, batch_size=2, reply_tokens=6)
    assert cache.meta["reply_tokens"] == 6 and len(cache.x_reply) == 5
    pairs = greedy_replies(path, tok, rows.texts("en"), 64, 6, batch_size=5)
    assert [len(r) for _, r in pairs] == cache.reply_len
    assert all(1 <= n <= 6 for n in cache.reply_len)
    model = load_model(path)
    first = model.config.num_hidden_layers - 2
    with torch.no_grad():
        for j, (p, r) in enumerate(pairs):
            solo = encode(tok, [rows.texts("en")[j]], 64, True)["input_ids"][0].tolist()
            assert p == solo  # the prompt exactly as eval encodes it
            gen = model.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False)
            assert gen[0, len(p):len(p) + len(r)].tolist() == r  # greedy, batched or not
            seq = torch.tensor([p + r[:-1]])
            hs = model(seq, output_hidden_states=True).hidden_states[first][0]
            assert cache.x_reply[j].shape == hs.shape
            assert (cache.x_reply[j] - hs).abs().max() < 1e-5
    # saved and read back per batch: the same streams, left-padded, with the reply lengths
    cache.save(tmp_path / "c")
    disk = DiskCache(tmp_path / "c")
    a, b = cache.collate([3, 1]), disk.collate([3, 1])
    for k in ("x_reply", "mask_reply", "reply_len", "x"):
        assert torch.equal(a[k], b[k]), k
    assert b["reply_len"].tolist() == [cache.reply_len[3], cache.reply_len[1]]


def test_reply_weight_changes_the_cache_key_only_when_on(setup):
    path, _, _ = setup
    rows = load_prompts("default", LANGS, split="train", max_samples=4)
    key = lambda **kw: cache_key(path, rows, _cfg(**kw), 64, True)  # noqa: E731
    assert key() == key(reply_tokens=8)  # no reply KL: replies are not built
    assert key(lambda_kl_replies=1.0) != key()
    assert key(lambda_kl_replies=1.0) == key(lambda_kl_replies=5.0)  # the weight is not
    assert key(lambda_kl_replies=1.0, reply_tokens=8) != key(lambda_kl_replies=1.0)


def _reply_kl(path, tok, delta, texts, new_tokens) -> float:
    """KL(base || base+delta) at the positions of the base's greedy replies to ``texts``
    (teacher-forced, mean over positions)."""
    pairs = greedy_replies(path, tok, texts, 64, new_tokens, batch_size=len(texts))
    model = load_model(path)
    lens = load_model(path)
    apply_delta(lens, delta)
    kls = []
    with torch.no_grad():
        for p, r in pairs:
            seq = torch.tensor([p + r[:-1]])
            a = torch.log_softmax(model(seq).logits[0, -len(r):].double(), -1)
            b = torch.log_softmax(lens(seq).logits[0, -len(r):].double(), -1)
            kls.append(torch.nn.functional.kl_div(b, a, log_target=True, reduction="none")
                       .sum(-1))
    return float(torch.cat(kls).mean())


def test_reply_kl_keeps_the_base_replies(setup, tmp_path):
    """The reply KL is 0 at the first step and keeps the base's English replies on held-out
    prompts far better than the prompt-token KL alone at the same weight."""
    path, tok, sub = setup
    prompts = load_prompts("default", LANGS, split="train", max_samples=8)
    heldout = load_prompts("default", LANGS, split="heldout", max_samples=12).texts("en")
    got = {}
    for name, extra in (("tokens", {}), ("replies", {"lambda_kl_replies": 10.0})):
        res = train(path, sub, prompts, _cfg(lambda_kl_tokens=10.0, reply_tokens=8, **extra),
                    tmp_path / "w", max_length=64)
        log = [json.loads(x) for x in res.log_path.read_text().splitlines()]
        got[name] = (_reply_kl(path, tok, res.delta, heldout, 8), log, res.delta)
    kl_tok, _, _ = got["tokens"]
    kl_rep, log, delta = got["replies"]
    assert delta.meta["loss_weights"]["kl_replies"] == 10.0
    assert "kl_replies" not in got["tokens"][1][0]
    assert abs(log[0]["kl_replies"]) < 1e-6  # the frozen copy is the base
    # measured: 0.033 (prompt-token KL only) vs 0.016 nats (with the reply KL), same weight;
    # the tiny random model's 8-token replies all change either way (the real model's
    # identical-reply share is in the README)
    assert kl_rep < 0.7 * kl_tok, (kl_tok, kl_rep)
    assert log[-1]["separate"] < 0.2 * log[0]["separate"]  # the targets still move
