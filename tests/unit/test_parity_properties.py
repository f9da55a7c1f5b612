"""Property tests of the parity metrics (hypothesis, from the ``dev`` extra)."""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis", reason="needs hypothesis: pip install '.[dev]'")

import numpy as np  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lens_merge.parity.metrics import DistinctContexts, first_mismatch, kl_per_position  # noqa: E402

ids = st.lists(st.integers(0, 4), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(ids, st.randoms(use_true_random=False)), min_size=1, max_size=6))
def test_distinct_contexts_equal_the_set_of_prefixes(prompts):
    dc = DistinctContexts()
    first_flag: dict[tuple[int, ...], bool] = {}
    n_all = 0
    for toks, rnd in prompts:
        flags = [rnd.random() < 0.5 for _ in toks]
        dc.add(toks, flags)
        n_all += len(toks)
        for p, ok in enumerate(flags):
            first_flag.setdefault(tuple(toks[:p + 1]), ok)
    assert dc.n == len(first_flag) and dc.n_all == n_all
    assert dc.same == sum(first_flag.values())
    assert 0.0 <= dc.agreement <= 1.0


@settings(max_examples=200, deadline=None)
@given(ids, ids)
def test_first_mismatch_is_the_first_differing_index(a, b):
    i = first_mismatch(a, b)
    if i is None:
        assert a == b
    else:
        assert a[:i] == b[:i] and (i == min(len(a), len(b)) or a[i] != b[i])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=2, max_size=8), st.floats(-50, 50))
def test_kl_is_zero_on_itself_and_shift_invariant(logits, shift):
    x = np.array([logits])
    assert kl_per_position(x, x)[0] == pytest.approx(0.0, abs=1e-12)
    y = x[:, ::-1].copy()
    assert kl_per_position(x, y)[0] >= -1e-12
    assert kl_per_position(x, y + shift)[0] == pytest.approx(kl_per_position(x, y)[0],
                                                             abs=1e-9)
