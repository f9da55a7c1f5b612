"""English protection: the delta kept off the English inputs' directions (null-space training)."""

from __future__ import annotations

import json

import pytest
import torch

from lens_merge.config import TrainConfig
from lens_merge.data import load_prompts
from lens_merge.lens.train.loop import train
from lens_merge.lens.train.protect import projector
from tests.integration.test_train_replies import LANGS, _reply_kl, setup  # noqa: F401


def _cfg(**kw):
    base = dict(top_k=2, lr=3e-3, epochs=4, batch_size=2, grad_accum=1, warmup_ratio=0.0,
                seed=0, max_grad_norm=None, separate_scale=8.0, lambda_retain=0.0,
                freeze_norms=True, reply_tokens=8)
    return TrainConfig(**(base | kw))


def test_projector_keeps_the_energy_share_out():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g) * torch.linspace(10, 0.01, 12)
    m = x.T @ x
    p = projector(m, 0.99)
    vals = torch.linalg.eigvalsh(m.double()).flip(0)
    share = torch.cumsum(vals, 0) / vals.sum()
    assert p.rank == int((share < 0.99).sum()) + 1  # the fewest directions reaching 99%
    dw = torch.randn(5, 12, generator=g)
    out = p.apply(dw)
    # dW P removes what dW does to x along the protected directions: the energy left
    left = float((out @ x.T).pow(2).sum() / (dw @ x.T).pow(2).sum())
    assert left < 0.05, left
    assert torch.allclose(p.apply(out), out, atol=1e-5)  # a projector: P P = P
    full = projector(m, 1.0)
    assert full.rank == 12 and full.apply(dw).abs().max() < 1e-5


def test_protection_needs_frozen_norms():
    with pytest.raises(ValueError, match="freeze_norms"):
        TrainConfig(protect_english=0.99, freeze_norms=False)


def test_protected_delta_leaves_english_and_moves_targets(setup, tmp_path):  # noqa: F811
    path, tok, sub = setup
    prompts = load_prompts("default", LANGS, split="train", max_samples=8)
    heldout = load_prompts("default", LANGS, split="heldout", max_samples=12).texts("en")
    got = {}
    for name, extra in (("free", {}), ("protected", {"protect_english": 0.99})):
        res = train(path, sub, prompts, _cfg(lambda_kl_replies=1.0, **extra), tmp_path / name,
                    max_length=64)
        log = [json.loads(x) for x in res.log_path.read_text().splitlines()]
        got[name] = (_reply_kl(path, tok, res.delta, heldout, 8), log, res.delta)
    kl_free, _, _ = got["free"]
    kl_prot, log, delta = got["protected"]
    # measured: held-out English reply KL 0.088 (free) vs 0.0012 nats (protected, 99%)
    assert kl_prot < 0.05 * kl_free, (kl_free, kl_prot)
    # the targets still move: separate 2.75 -> 1.82 (free: -> 0.31)
    assert log[-1]["separate"] < 0.8 * log[0]["separate"]
    rec = delta.meta["english_protection"]
    assert delta.meta["hyperparameters"]["protect_english"] == 0.99
    # per block: q/k/v share one input, gate/up one, o and down their own: 4 spaces a block
    assert rec["input_spaces"] == 8 and rec["energy_kept_out_min"] >= 0.99
    assert all(0 < r < d for r, d in zip(rec["protected_rank"], rec["input_dim"], strict=True))
    assert "english_protection" not in got["free"][2].meta


def test_card_names_the_protection():
    from lens_merge.release._render import _changes

    delta = {"blocks": [28, 29], "top_k": 2, "tensors": {},
             "hyperparameters": {"protect_english": 0.9999, "lr": 5e-4},
             "english_protection": {"input_spaces": 8, "protected_rank": [310, 500, 577],
                                    "input_dim": [576, 576, 1536]}}
    text = "\n".join(_changes({"delta": delta, "num_layers": 30, "languages": ["en", "zh"]}))
    assert ("**English protection**: every weight change is kept off the input directions "
            "holding 99.99% of the English inputs' energy (null-space projection; 3 input "
            "spaces, protected ranks 310-577 of 1536)") in text
    assert "English protection" not in "\n".join(_changes(
        {"delta": delta | {"english_protection": None}, "num_layers": 30, "languages": ["en"]}))
