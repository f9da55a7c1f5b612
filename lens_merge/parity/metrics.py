"""The numbers of a parity check, on ``[positions, vocab]`` logits (torch or numpy)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _np(x: Any):
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def max_abs_diff(ref: Any, got: Any) -> float:
    """max |ref - got| over every position and vocabulary entry (inf when ``got`` is not
    finite)."""
    import numpy as np

    a, b = _np(ref), _np(got)
    if a.shape != b.shape:
        raise ValueError(f"logits of shape {b.shape} cannot be compared with {a.shape}")
    if not np.isfinite(b).all():
        return float("inf")
    return float(np.abs(a - b).max()) if a.size else 0.0


def top1_same(ref: Any, got: Any) -> list[bool]:
    """Per position: do both argmaxes agree?"""
    a, b = _np(ref), _np(got)
    return [bool(x) for x in (a.argmax(-1) == b.argmax(-1)).reshape(-1)]


def kl_per_position(ref: Any, got: Any) -> list[float]:
    """KL(softmax(ref) || softmax(got)) in nats, per position (float64 math)."""
    import numpy as np

    a, b = _np(ref), _np(got)
    la = a - a.max(-1, keepdims=True)
    la = la - np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb = lb - np.log(np.exp(lb).sum(-1, keepdims=True))
    return [float(x) for x in (np.exp(la) * (la - lb)).sum(-1).reshape(-1)]


def first_mismatch(ref_tokens: Sequence[int], tokens: Sequence[int]) -> int | None:
    """Index of the first differing token of two greedy continuations (None: identical)."""
    n = min(len(ref_tokens), len(tokens))
    first = next((i for i in range(n) if ref_tokens[i] != tokens[i]), None)
    if first is None and len(ref_tokens) != len(tokens):
        return n
    return first


class DistinctContexts:
    """Top-1 agreement over distinct contexts.

    A prefix that several prompts share (the chat template's system prompt) is one context,
    counted once: one near-tie there must not weigh once per prompt.
    """

    def __init__(self) -> None:
        self._seen: set[tuple[int, ...]] = set()
        self.n = self.same = 0
        self.n_all = self.same_all = 0

    def add(self, ids: Sequence[int], same: Sequence[bool]) -> tuple[int, int]:
        """Record one prompt's per-position agreement; returns (new contexts, agreeing)."""
        if len(ids) != len(same):
            raise ValueError(f"{len(ids)} token ids but {len(same)} agreement flags")
        new = agree = 0
        for p, ok in enumerate(same):
            ctx = tuple(ids[:p + 1])
            self.n_all += 1
            self.same_all += int(ok)
            if ctx in self._seen:
                continue
            self._seen.add(ctx)
            new += 1
            agree += int(ok)
        self.n += new
        self.same += agree
        return new, agree

    @property
    def agreement(self) -> float:
        return self.same / self.n if self.n else 1.0

    @property
    def agreement_all_positions(self) -> float:
        return self.same_all / self.n_all if self.n_all else 1.0


class GenerationTally:
    """Running numbers of a group of compared prompts (all of them, or one language).

    Each ``add`` takes a prompt's row (``max_abs_logit_diff``, ``generation_match``,
    ``first_token_match`` and, where the verifier checks tokenization, ``tokenization_match``)
    and its per-position top-1 agreement, counted over distinct contexts.
    """

    def __init__(self) -> None:
        self.top1 = DistinctContexts()
        self.worst = 0.0
        self.n = self.same_gen = self.same_first = self.same_tokens = self.n_tokenized = 0

    def add(self, ids: Sequence[int], row: dict[str, Any], same: Sequence[bool]
            ) -> tuple[int, int]:
        """Record one prompt; returns (new contexts, agreeing among them)."""
        self.worst = max(self.worst, row["max_abs_logit_diff"])
        self.n += 1
        self.same_gen += int(row["generation_match"])
        self.same_first += int(row["first_token_match"])
        if "tokenization_match" in row:
            self.n_tokenized += 1
            self.same_tokens += int(row["tokenization_match"])
        return self.top1.add(ids, same)

    def metrics(self) -> dict[str, float | int]:
        n = max(self.n, 1)
        out: dict[str, float | int] = {
            "max_abs_logit_diff": self.worst, "top1_agreement": self.top1.agreement,
            "top1_agreement_all_positions": self.top1.agreement_all_positions,
            "generation_match": self.same_gen / n, "first_token_agreement": self.same_first / n,
            "n_contexts": self.top1.n, "n_positions": self.top1.n_all, "n_prompts": self.n}
        if self.n_tokenized:
            out["tokenization_match"] = self.same_tokens / self.n_tokenized
        return out
