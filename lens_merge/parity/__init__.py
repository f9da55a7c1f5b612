"""Parity checking shared by every verifier (fold, GGUF, ONNX, adapters).

- ``prompts``: which prompts a verification runs (the artifact's Lens languages, held-out rows
  of the default data, or the user's own).
- ``metrics``: max |logit diff|, top-1 agreement over distinct contexts, KL, greedy equality.
- ``thresholds``: the limits per verifier and output type, as one table.
- ``logits``: ``prompt_logits``, one model's logits on the prompts (kept, or compared as they
  come), so a verifier holds one model at a time.
- The report itself is ``lens_merge.records.ParityReport``.
"""

from lens_merge.parity.logits import prompt_logits
from lens_merge.parity.metrics import (
    DistinctContexts,
    first_mismatch,
    kl_per_position,
    max_abs_diff,
    top1_same,
)
from lens_merge.parity.prompts import checkpoint_languages, parity_prompts
from lens_merge.parity.thresholds import THRESHOLDS, checks_for, thresholds_for

__all__ = [
    "THRESHOLDS",
    "DistinctContexts",
    "checkpoint_languages",
    "checks_for",
    "first_mismatch",
    "kl_per_position",
    "max_abs_diff",
    "parity_prompts",
    "prompt_logits",
    "thresholds_for",
    "top1_same",
]
