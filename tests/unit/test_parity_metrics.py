"""lens_merge.parity: metric values on hand-computed logits, distinct contexts, thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lens_merge.parity.metrics import (
    DistinctContexts,
    first_mismatch,
    kl_per_position,
    max_abs_diff,
    top1_same,
)
from lens_merge.parity.thresholds import LOWER_IS_BETTER, THRESHOLDS, checks_for


def test_distinct_contexts_count_a_shared_prefix_once():
    dc = DistinctContexts()
    assert dc.add([1, 2, 3], [True, False, True]) == (3, 2)
    # (1,) and (1, 2) were seen: only (1, 2, 4) is new, and the prefix flags are not recounted
    assert dc.add([1, 2, 4], [False, False, True]) == (1, 1)
    assert (dc.n, dc.same, dc.n_all, dc.same_all) == (4, 3, 6, 3)
    assert dc.agreement == 0.75 and dc.agreement_all_positions == 0.5
    assert dc.add([1, 2, 3], [False, False, False]) == (0, 0)  # the same prompt again
    assert dc.agreement == 0.75 and dc.agreement_all_positions == 3 / 9


def test_distinct_contexts_edge_cases():
    dc = DistinctContexts()
    assert dc.agreement == 1.0 and dc.agreement_all_positions == 1.0
    with pytest.raises(ValueError, match="3 token ids but 2 agreement flags"):
        dc.add([1, 2, 3], [True, True])
    # the same token at another position is another context
    assert dc.add([7, 7, 7], [True, True, False]) == (3, 2)


def test_kl_matches_the_hand_computed_value():
    ref = np.array([[0.0, 0.0], [1.0, 2.0]])
    got = np.array([[math.log(3.0), 0.0], [1.0, 2.0]])
    kl = kl_per_position(ref, got)
    # p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln(2) = 1/2 ln(4/3)
    assert kl[0] == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    assert kl[1] == pytest.approx(0.0, abs=1e-15)
    # invariant to a constant shift of either side's logits, and asymmetric
    assert kl_per_position(ref + 5, got - 3)[0] == pytest.approx(kl[0], rel=1e-12)
    assert kl_per_position(got, ref)[0] != pytest.approx(kl[0], rel=1e-3)


def test_kl_is_stable_on_large_logits_and_accepts_torch():
    ref = torch.tensor([[[1000.0, 0.0, -1000.0]]])
    got = torch.tensor([[[1000.0, 0.0, -1000.0]]], dtype=torch.bfloat16)
    kl = kl_per_position(ref, got)
    assert len(kl) == 1 and kl[0] == pytest.approx(0.0, abs=1e-12) and math.isfinite(kl[0])


def test_top1_and_max_abs_diff():
    ref = np.array([[0.0, 1.0, 0.5], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    got = np.array([[0.0, 1.0, 0.6], [0.0, 2.5, 0.0], [0.0, 0.0, 3.0]])
    assert top1_same(ref, got) == [True, False, True]
    assert max_abs_diff(ref, got) == pytest.approx(2.5)
    assert max_abs_diff(torch.tensor(ref), torch.tensor(ref)) == 0.0
    bad = got.copy()
    bad[0, 0] = np.nan
    assert max_abs_diff(ref, bad) == math.inf
    with pytest.raises(ValueError, match=r"shape \(2, 3\) cannot be compared with \(3, 3\)"):
        max_abs_diff(ref, got[:2])


@pytest.mark.parametrize("a, b, want", [
    ([1, 2, 3], [1, 2, 3], None),
    ([1, 2, 3], [1, 9, 3], 1),
    ([1, 2, 3], [1, 2], 2),
    ([], [5], 0),
    ([], [], None),
])
def test_first_mismatch(a, b, want):
    assert first_mismatch(a, b) == want


@pytest.mark.parametrize("kind, variant", [(k, v) for k, rows in THRESHOLDS.items()
                                           for v in rows])
def test_every_threshold_can_pass_and_can_fail(kind, variant):
    limits = THRESHOLDS[kind][variant]
    perfect = {m: 0.0 if m in LOWER_IS_BETTER else 1.0 for m in limits}
    assert all(c.passed for c in checks_for(limits, perfect))
    for m, limit in limits.items():
        worst = {**perfect, m: math.inf if m in LOWER_IS_BETTER else 0.0}
        failed = [c.name for c in checks_for(limits, worst) if not c.passed]
        assert failed == [m], f"{kind}/{variant}: {m} <= {limit} cannot fail"
        assert not [c for c in checks_for(limits, {**perfect, m: None}) if c.passed
                    and c.name == m]  # a missing metric fails
