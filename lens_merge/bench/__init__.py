"""``lens-merge bench``: lm-evaluation-harness scores of the base and the Lens model.

- ``run.run_bench``: base and base + delta (in memory) on lm-eval tasks -> ``BenchReport``.
- ``record``: the ``bench.json`` schema (``BenchReport``) and ``read_bench``.
- ``summary``: the table rows and the model card's ``model-index`` entries and section.

``lm_eval`` (extra ``bench``) is imported only inside the functions that run it.
"""

from lens_merge.bench.record import BENCH_FILE, BENCH_SCHEMA, BenchReport, read_bench
from lens_merge.bench.run import run_bench

__all__ = ["BENCH_FILE", "BENCH_SCHEMA", "BenchReport", "read_bench", "run_bench"]
