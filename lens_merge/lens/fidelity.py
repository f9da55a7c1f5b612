"""Language-fidelity measures: echoes, line-level pass rate with a Wilson interval, the
indicative first tokens of each language and the probability mass a model puts on them.

Pure functions; no model is loaded here (torch only for ``first_token_mass``). The rules and
their thresholds are written in the docstrings below; the README quotes them.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lens_merge.errors import ConfigError, DataError
from lens_merge.lens._scripts import LANG_SCRIPTS, token_bytes, token_scripts

if TYPE_CHECKING:
    import torch

    from lens_merge.lens.langid import LanguageId

ECHO_MIN_MATCH = 8  # characters of a shared substring that count as copied
ECHO_SHARE = 0.75  # copied share of the reply at or above which it is an echo
MIN_COUNT = 3  # Latin rule: occurrences of a token (key) in the language's texts
MIN_LOG_RATIO = math.log(4.0)  # Latin rule: smoothed log-ratio against every other language
SMOOTHING = 0.5  # Latin rule: add-alpha smoothing of the relative frequencies

_WS = re.compile(r"\s+")


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold().replace("\ufffd", "")
    return _WS.sub(" ", text).strip()


def copied_share(reply: str, prompt: str) -> float:
    """Share of the reply's characters that lie inside a substring of at least
    ``min(ECHO_MIN_MATCH, len(prompt))`` characters also found in the prompt, both normalised
    (NFKC, case-folded, U+FFFD dropped, whitespace runs to one space). 0.0 for an empty reply."""
    r, p = _normalise(reply), _normalise(prompt)
    if not r or not p:
        return 0.0
    m = min(ECHO_MIN_MATCH, len(p))
    grams = {p[i:i + m] for i in range(len(p) - m + 1)}
    covered = [False] * len(r)
    for i in range(len(r) - m + 1):
        if r[i:i + m] in grams:
            covered[i:i + m] = [True] * m
    return sum(covered) / len(r)


def is_echo(reply: str, prompt: str) -> bool:
    """The reply mostly copies the prompt: ``copied_share(reply, prompt) >= ECHO_SHARE``
    (0.75; shared substrings of >= 8 characters, or of the whole prompt when shorter).

    "The capital of France is Paris." to "What is the capital of France?" copies 21 of 31
    characters (0.68) and is an answer; a prompt repeated whole or cut short is an echo. A
    reply that restates the question and then answers is not an echo (no prefix rule).
    """
    return copied_share(reply, prompt) >= ECHO_SHARE


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n (95% for z = 1.96); (0.0, 1.0) for n = 0.

    Raises:
        DataError: k outside [0, n].
    """
    if n == 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise DataError(f"wilson: expected 0 <= k <= n, got k={k}, n={n}")
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def line_pass_rate(replies: Sequence[str], prompts: Sequence[str], lang: str,
                   lid: LanguageId) -> dict[str, Any]:
    """Line-level pass rate (LCB) of ``replies`` to ``prompts`` in ``lang``, echoes failing.

    A reply passes when it is not an echo of its prompt (``is_echo``) and every lettered line
    is identified as ``lang`` (``lid.lines_in``).

    Returns:
        ``rate`` (passed / n; NaN for n = 0), ``ci`` ((lo, hi), Wilson 95%), ``echo`` (share
        of echoes; NaN for n = 0), ``n``, ``passed`` (count), ``echoes`` (count) and
        ``outcomes`` (per reply: "pass", "echo" or "fail").

    Raises:
        DataError: replies and prompts differ in number.
    """
    if len(replies) != len(prompts):
        raise DataError(f"line_pass_rate({lang}): {len(replies)} replies for "
                        f"{len(prompts)} prompts")
    outcomes = ["echo" if is_echo(r, p) else "pass" if lid.lines_in(r, lang) else "fail"
                for r, p in zip(replies, prompts, strict=True)]
    n, k, e = len(outcomes), outcomes.count("pass"), outcomes.count("echo")
    return {"rate": k / n if n else math.nan, "ci": wilson(k, n),
            "echo": e / n if n else math.nan, "n": n, "passed": k, "echoes": e,
            "outcomes": outcomes}


def _latin_codes() -> frozenset[str]:
    from lingua import Language

    return frozenset(x.iso_code_639_1.name.lower() for x in Language.all_with_latin_script())


def _key(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").lstrip().casefold()


def _word_starts(row: list[int], raw: list[bytes | None]) -> list[int]:
    """Ids of ``row`` that begin a word: the first one, one with leading whitespace, or one
    after a token that does not end in a letter."""
    out, prev = [], ""
    for i in row:
        b = raw[i] if 0 <= i < len(raw) else None
        text = b.decode("utf-8", errors="replace") if b is not None else ""
        if text and (not out and not prev or text[0].isspace() or not prev[-1:].isalpha()):
            out.append(i)
        prev = text or prev
    return out


def indicative_tokens(tokenizer: Any, texts: dict[str, list[str]],
                      english: str = "en") -> dict[str, list[int]]:
    """Vocabulary ids indicative of each language of ``texts`` (sorted, deterministic).

    Non-Latin scripts (zh, ja, ko, ar, bn, ru, hi, ...): ids whose bytes show the language's
    script (``token_scripts``): ja kana or Han; zh Han and no kana; ko Hangul; ar Arabic; bn
    Bengali; the texts are not used.

    Latin-script languages (es, fr, de, sw, en, ...): the data decides. Every id maps to a key,
    its decoded text without leading whitespace, case-folded (so " la", "la", " La" and "La"
    are one key: a reply's first token has no leading space). Keys are counted at word starts
    (a text's first token, a token with leading whitespace, or one after a token that does not
    end in a letter) in each Latin language's tokenized texts, keys without letters left out
    (byte-level BPE and SentencePiece vocabularies carry the space in the token). A key is
    indicative of L when it occurs >= ``MIN_COUNT`` (3) times in L's texts and its smoothed
    log-ratio of relative frequencies, log((c_L + a) / (N_L + a K)) - log((c_M + a) / (N_M +
    a K)) with a = ``SMOOTHING`` (0.5), N the counted tokens of a language and K the distinct
    keys of all Latin languages, is >= ``MIN_LOG_RATIO`` (log 4) against ``english`` and
    against every other Latin language of ``texts``. All ids of indicative keys are returned.
    When no other Latin language is given, every id with a Latin letter counts.

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: language code -> texts (Latin-script languages need them, and ``english``).
        english: the reference language's code.

    Raises:
        ConfigError: a language that is neither in the script table nor Latin-script.
        DataError: a Latin-script language, or ``english``, without texts.
    """
    raw = token_bytes(tokenizer)
    latin_all = _latin_codes()
    latin = sorted(c for c in texts if c not in LANG_SCRIPTS and c in latin_all)
    for lang in texts:
        if lang not in LANG_SCRIPTS and lang not in latin_all:
            raise ConfigError(f"language {lang!r}: no script rule and not a Latin-script "
                              "language lingua knows; indicative tokens cannot be chosen")
    out: dict[str, list[int]] = {}
    shown = [token_scripts(b) if b is not None else set() for b in raw]
    for lang in texts:
        if lang in LANG_SCRIPTS:
            any_of, none_of = LANG_SCRIPTS[lang]
            out[lang] = [i for i, s in enumerate(shown) if s & any_of and not s & none_of]
    refs = sorted(set(latin) | ({english} if latin else set()))
    if len(refs) < 2:
        for lang in latin:
            out[lang] = [i for i, s in enumerate(shown) if "latin" in s]
        return {c: out[c] for c in texts}
    keys = [_key(b) if b is not None else "" for b in raw]
    lettered = [any(ch.isalpha() for ch in k) for k in keys]
    counts: dict[str, Counter] = {}
    for lang in refs:
        if not texts.get(lang):
            raise DataError(f"indicative_tokens: no texts for {lang!r}; the Latin-script rule "
                            "compares token counts against English and each Latin language")
        ids = tokenizer(list(texts[lang]), add_special_tokens=False)["input_ids"]
        counts[lang] = Counter(keys[i] for row in ids for i in _word_starts(row, raw)
                               if lettered[i])
    a = SMOOTHING
    denom = {lang: sum(c.values()) + a * len(set().union(*counts.values()))
             for lang, c in counts.items()}

    def logf(lang: str, key: str) -> float:
        return math.log((counts[lang][key] + a) / denom[lang])

    for lang in latin:
        good = {k for k, c in counts[lang].items() if c >= MIN_COUNT
                and all(logf(lang, k) - logf(m, k) >= MIN_LOG_RATIO for m in refs if m != lang)}
        out[lang] = [i for i, k in enumerate(keys) if raw[i] is not None and k in good]
    return {c: out[c] for c in texts if c in out}


def first_token_mass(logits: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Softmax probability mass on ``token_ids`` of each row of ``logits`` (fp64).

    Args:
        logits: [n, V] next-token logits at the first reply position.
        token_ids: vocabulary ids (duplicates count once); empty gives zeros.

    Returns:
        [n] float64 tensor in [0, 1].

    Raises:
        DataError: logits not 2-D, or an id outside [0, V).
    """
    import torch

    if logits.ndim != 2:
        raise DataError(f"first_token_mass: logits must be [n, V], got {tuple(logits.shape)}")
    ids = torch.as_tensor(sorted(set(int(i) for i in token_ids)), dtype=torch.long)
    if ids.numel() == 0:
        return torch.zeros(logits.shape[0], dtype=torch.float64)
    if ids[0] < 0 or ids[-1] >= logits.shape[1]:
        raise DataError(f"first_token_mass: token ids must lie in [0, {logits.shape[1]}), "
                        f"got {int(ids[0])}..{int(ids[-1])}")
    return torch.softmax(logits.double(), dim=-1)[:, ids].sum(-1)
