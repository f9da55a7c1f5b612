"""Tokenizer -> GGUF: vocabulary, merges or scores, token types, special ids, chat template.

Two tokenizer kinds are written: byte-level BPE (``tokenizer.ggml.model = gpt2``, SmolLM2,
Llama-3, Qwen2) from ``tokenizer.json``, and SentencePiece (``llama``, Llama-2, Mistral v0.1,
Phi-3) from ``tokenizer.model``. For BPE the pre-tokenizer family (``tokenizer.ggml.pre``) is
found by hashing the token ids of a fixed check text against ``pretokenizers.json``.

``pretokenizers.json`` is kept because gguf-py does not have that table: it lives in
llama.cpp's ``convert_hf_to_gguf.py`` (``get_vocab_base_pre``), which is not part of the
``gguf`` package. Key names, token types and the writer come from gguf-py itself.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from lens_merge.errors import ExportError

# Token texts llama.cpp treats as "end of turn" in chat models (first one present wins).
EOT_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass
class Vocab:
    """Everything the ``tokenizer.*`` keys of a GGUF hold."""

    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str | bytes]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/eot/unk/pad/...
    add_special: dict[str, bool] = field(default_factory=dict)  # bos/eos
    chat_template: str | None = None
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None
    pre_hash: str | None = None

    def write(self, w) -> None:
        """Add the ``tokenizer.*`` keys to a ``gguf.GGUFWriter``."""
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.token_types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges:
            w.add_token_merges(self.merges)
        for typ, tid in self.special_ids.items():
            getattr(w, f"add_{typ}_token_id")(tid)
        for typ, value in self.add_special.items():
            getattr(w, f"add_add_{typ}_token")(value)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.remove_extra_whitespaces is not None:
            w.add_remove_extra_whitespaces(self.remove_extra_whitespaces)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


@cache
def pretokenizer_table() -> dict[str, Any]:
    """The check text and the known hash -> family table (``pretokenizers.json``)."""
    raw = resources.files(__package__).joinpath("pretokenizers.json").read_text("utf-8")
    return json.loads(raw)


def pretokenizer_hash(tokenizer) -> str:
    """sha256 of ``str(tokenizer.encode(check_text))``, as llama.cpp's converter computes it."""
    ids = tokenizer.encode(pretokenizer_table()["check_text"])
    return hashlib.sha256(str(list(ids)).encode()).hexdigest()


def detect_pretokenizer(tokenizer, model_dir: Path) -> tuple[str, str]:
    """The pre-tokenizer family of a BPE tokenizer.

    Returns:
        (family name for ``tokenizer.ggml.pre``, the hash).

    Raises:
        ExportError: for an unknown hash, printing it and how to pass ``--tokenizer-pre``.
    """
    h = pretokenizer_hash(tokenizer)
    for row in pretokenizer_table()["hashes"]:
        if row["sha256"] == h:
            return row["pre"], h
    known = sorted({r["pre"] for r in pretokenizer_table()["hashes"]})
    raise ExportError(
        f"{model_dir}: the tokenizer's pre-tokenizer is not recognized (check-text hash {h}). "
        "If you know which family it belongs to, pass it with --tokenizer-pre NAME "
        f"(tokenizer_pre=NAME in Python, export.gguf.tokenizer_pre in a recipe); known: "
        f"{', '.join(known)}"
    )


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or (
        text.startswith("<") and text.endswith(">") and " " not in text and len(text) > 2)


def _load_hf_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # noqa: BLE001 - any loader failure is a model problem here
        raise ExportError(f"{model_dir}: cannot load the tokenizer ({exc})") from exc


def _special_vocab(model_dir: Path, n_vocab: int, load_merges: bool):
    import gguf

    return gguf.SpecialVocab(model_dir, load_merges=load_merges, n_vocab=n_vocab)


def _behaviour_flags(tokenizer) -> dict[str, bool]:
    """add_bos/add_eos as the HF tokenizer actually behaves on a plain text."""
    ids = list(tokenizer.encode("Hello"))
    plain = list(tokenizer.encode("Hello", add_special_tokens=False))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    extra = len(ids) > len(plain)
    return {"bos": bool(extra and bos is not None and ids[0] == bos),
            "eos": bool(extra and eos is not None and ids[-1] == eos)}


def _special_ids(tokenizer, sv, n_vocab: int) -> dict[str, int]:
    ids: dict[str, int] = {}
    for typ in ("bos", "eos", "unk", "pad"):
        tid = sv.special_token_ids.get(typ)
        if tid is None:
            tid = getattr(tokenizer, f"{typ}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            ids[typ] = tid
    vocab = tokenizer.get_vocab()
    for text in EOT_TEXTS:
        tid = vocab.get(text)
        if tid is not None and tid < n_vocab:
            ids["eot"] = tid
            break
    return ids


def _chat_template(tokenizer, sv) -> str | None:
    tmpl = getattr(tokenizer, "chat_template", None) or sv.chat_template
    if isinstance(tmpl, dict):  # named templates: keep the default one
        tmpl = tmpl.get("default")
    if isinstance(tmpl, list):
        tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
    return tmpl if isinstance(tmpl, str) else None


def bpe_vocab(model_dir: Path, n_vocab: int, tokenizer_pre: str | None = None) -> Vocab:
    """A byte-level BPE (``gpt2``) vocabulary from ``tokenizer.json``."""
    import gguf

    tok = _load_hf_tokenizer(model_dir)
    if tokenizer_pre:
        pre, h = tokenizer_pre, pretokenizer_hash(tok)
    else:
        pre, h = detect_pretokenizer(tok, model_dir)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ExportError(f"{model_dir}: tokenizer ids reach {max(vocab.values())}, but "
                          f"config.json vocab_size is {n_vocab}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens: list[str | bytes] = []
    types: list[int] = []
    for i in range(n_vocab):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif text in added:
            info = decoder.get(i)
            if (info is not None and info.special) or _looks_special(text):
                types.append(gguf.TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    sv = _special_vocab(model_dir, n_vocab, load_merges=True)
    if not sv.merges:
        raise ExportError(f"{model_dir}: tokenizer.json holds no BPE merges")
    return Vocab(model="gpt2", pre=pre, tokens=tokens, token_types=[int(t) for t in types],
                 merges=list(sv.merges), special_ids=_special_ids(tok, sv, n_vocab),
                 add_special=_behaviour_flags(tok), chat_template=_chat_template(tok, sv),
                 pre_hash=h)


def spm_vocab(model_dir: Path, n_vocab: int) -> Vocab:
    """A SentencePiece (``llama``) vocabulary with scores from ``tokenizer.model``."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    path = model_dir / "tokenizer.model"
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    if sp.vocab_size() > n_vocab:
        raise ExportError(f"{path}: {sp.vocab_size()} pieces, but config.json vocab_size is "
                          f"{n_vocab}")
    T = gguf.TokenType
    tokens: list[str | bytes] = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-1000.0] * n_vocab
    types = [int(T.UNUSED)] * n_vocab
    for i in range(sp.vocab_size()):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = float(sp.GetScore(i))
        kind = T.NORMAL
        if sp.IsUnknown(i):
            kind = T.UNKNOWN
        elif sp.IsControl(i):
            kind = T.CONTROL
        elif sp.IsUnused(i):
            kind = T.UNUSED
        elif sp.IsByte(i):
            kind = T.BYTE
        types[i] = int(kind)
    tok = _load_hf_tokenizer(model_dir)
    for i, info in tok.added_tokens_decoder.items():
        if i >= n_vocab or (i < sp.vocab_size() and sp.IdToPiece(i) == info.content):
            continue  # a piece the model already has keeps its score and type
        tokens[i] = info.content.encode("utf-8")
        scores[i] = -1000.0
        types[i] = int(T.CONTROL if info.special else T.USER_DEFINED)
    sv = _special_vocab(model_dir, n_vocab, load_merges=False)
    add_prefix, remove_ws = _spm_normalizer(path)
    first = tok.encode("Hello", add_special_tokens=False)[:1]
    if first:  # what transformers actually does wins over the proto (parity is the goal)
        add_prefix = tok.convert_ids_to_tokens(first[0]).startswith("\u2581")
    return Vocab(model="llama", pre="default", tokens=tokens, token_types=types, scores=scores,
                 special_ids=_special_ids(tok, sv, n_vocab), add_special=_behaviour_flags(tok),
                 chat_template=_chat_template(tok, sv), add_space_prefix=add_prefix,
                 remove_extra_whitespaces=remove_ws)


def _spm_normalizer(path: Path) -> tuple[bool | None, bool | None]:
    """add_dummy_prefix / remove_extra_whitespaces from the SentencePiece model proto."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # pragma: no cover - protobuf missing: llama.cpp's defaults apply
        return None, None
    m = pb.ModelProto()
    m.ParseFromString(path.read_bytes())
    ns = m.normalizer_spec
    return bool(ns.add_dummy_prefix), bool(ns.remove_extra_whitespaces)


def load_vocab(model_dir: str | Path, n_vocab: int, tokenizer_pre: str | None = None) -> Vocab:
    """The GGUF vocabulary of a model directory.

    Args:
        model_dir: HF model directory with ``tokenizer.model`` or ``tokenizer.json``.
        n_vocab: ``vocab_size`` of ``config.json`` (the embedding rows); the list is padded.
        tokenizer_pre: force the BPE pre-tokenizer family instead of detecting it.

    Raises:
        ExportError: when no supported tokenizer is found or the pre-tokenizer is unknown.
    """
    d = Path(model_dir)
    if (d / "tokenizer.model").is_file():
        return spm_vocab(d, n_vocab)
    tj = d / "tokenizer.json"
    if tj.is_file():
        kind = json.loads(tj.read_text(encoding="utf-8")).get("model", {}).get("type")
        if kind == "BPE":
            return bpe_vocab(d, n_vocab, tokenizer_pre)
        raise ExportError(f"{tj}: tokenizer model type {kind!r} is not supported; supported: "
                          "BPE (tokenizer.json) and SentencePiece (tokenizer.model)")
    raise ExportError(f"{d}: no tokenizer.json or tokenizer.model (GGUF needs the tokenizer)")
