"""Language identification of replies with ``lingua-language-detector``, restricted to the
languages in play, and the Language Confusion Benchmark's line-level check.

Rules (numbers go into the README):
- ``identify(text)``: lingua's confidence values over the given languages (they sum to 1);
  the top language when its confidence is at least ``min_confidence`` (default 0.5), else
  None; None too for text with no letters (digits, punctuation, symbols only).
- ``lines_in(text, lang)`` (LCB's line-level pass): every non-empty line that has letters must
  be identified as ``lang``. Lines without letters, and fenced code (between lines starting
  with three backticks, the fences included) are ignored. A line too short to tell (fewer than
  ``MIN_LINE_LETTERS`` = 4 letters: "OK", which lingua calls Swahili at 0.71) or that lingua
  is unsure about (top confidence below ``min_confidence``: "Sure!" is fr 0.43 / en 0.38)
  takes the verdict of the whole reply (all lettered lines joined, top language without a
  threshold). A reply with no lettered line (empty, digits, ``\ufffd`` bytes) fails.
- Mixed scripts (checked with lingua 2.1.1 on the ten default languages): lingua counts the
  words of each script and the script with more words decides; Han and kana count per
  character. So "저는 Python을 좋아합니다" -> ko, "Python是一种编程语言" -> zh,
  "Tokyo は日本の首都です" -> ja, "Python هو لغة برمجة" -> ar, but "안녕하세요 Python" (a tie)
  and "我喜欢 machine learning 和 deep learning" (Latin words outnumber) -> en. A line that is
  mostly English words inside a Korean or Chinese reply therefore fails the line check, as in
  LCB; a single code name in a sentence of the target script does not.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from lens_merge.errors import ConfigError

MIN_CONFIDENCE = 0.5
MIN_LINE_LETTERS = 4


def has_letters(text: str) -> bool:
    """True when ``text`` contains at least one letter (any script)."""
    return any(ch.isalpha() for ch in text)


@lru_cache(maxsize=16)
def _detector(codes: tuple[str, ...]) -> tuple[Any, dict[Any, str]]:
    """lingua detector for sorted ISO 639-1 ``codes`` (built once per set) and its
    Language -> code map."""
    from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

    langs = {}
    for code in codes:
        try:
            langs[Language.from_iso_code_639_1(IsoCode639_1.from_str(code))] = code
        except ValueError:
            raise ConfigError(
                f"language {code!r}: unknown to the language identifier (lingua); use an ISO "
                "639-1 code lingua supports (en, zh, ja, ko, ar, bn, sw, es, fr, de, ...)"
            ) from None
    return LanguageDetectorBuilder.from_languages(*langs).build(), langs


class LanguageId:
    """Identifier restricted to ``languages`` (ISO 639-1 codes); the lingua detector is built
    once per language set and shared by every instance.

    Args:
        languages: the codes in play (at least two distinct ones).
        min_confidence: lowest top confidence for a verdict (``identify`` gives None below).

    Raises:
        ConfigError: fewer than two distinct languages, or a code lingua does not know.
    """

    def __init__(self, languages: list[str], min_confidence: float = MIN_CONFIDENCE) -> None:
        codes = tuple(sorted({str(c).strip().lower() for c in languages}))
        if len(codes) < 2:
            raise ConfigError(f"languages: language identification needs at least two "
                              f"languages, got {list(languages)}")
        if not 0.0 <= min_confidence < 1.0:
            raise ConfigError(f"min_confidence: expected a value in [0, 1), "
                              f"got {min_confidence}")
        self.languages = codes
        self.min_confidence = float(min_confidence)
        self._det, self._code = _detector(codes)

    def confidences(self, text: str) -> dict[str, float]:
        """Confidence of each language for ``text`` (they sum to 1; all 0 without letters).

        Returns:
            code -> confidence, highest first.
        """
        if not has_letters(text):
            return {c: 0.0 for c in self.languages}
        vals = self._det.compute_language_confidence_values(text)
        return {self._code[v.language]: float(v.value) for v in vals}

    def _top(self, text: str) -> tuple[str | None, float]:
        conf = self.confidences(text)
        code = max(conf, key=conf.get)
        return (code, conf[code]) if conf[code] > 0.0 else (None, 0.0)

    def identify(self, text: str) -> str | None:
        """Language of ``text``, or None without letters or below ``min_confidence``."""
        code, value = self._top(text)
        return code if code is not None and value >= self.min_confidence else None

    def line_verdicts(self, text: str) -> list[str | None]:
        """The verdict of each lettered line of ``text`` (see the module rules), in order."""
        lines, fenced = [], False
        for ln in (x.strip() for x in text.splitlines()):
            if ln.startswith("```"):
                fenced = not fenced
            elif not fenced and has_letters(ln):
                lines.append(ln)
        if not lines:
            return []
        found = [self.identify(ln) if sum(ch.isalpha() for ch in ln) >= MIN_LINE_LETTERS
                 else None for ln in lines]
        if any(f is None for f in found):
            whole = self._top("\n".join(lines))[0]
            found = [whole if f is None else f for f in found]
        return found

    def lines_in(self, text: str, lang: str) -> bool:
        """LCB line-level pass: every lettered line of ``text`` is in ``lang``.

        Args:
            text: a reply.
            lang: the expected ISO 639-1 code (one of ``languages``).

        Returns:
            False for a reply without a lettered line; otherwise whether all lines pass.

        Raises:
            ConfigError: ``lang`` is not one of the identifier's languages.
        """
        if lang not in self.languages:
            raise ConfigError(f"language {lang!r}: not one of the identifier's languages "
                              f"{list(self.languages)}")
        found = self.line_verdicts(text)
        return bool(found) and all(f == lang for f in found)


def identify(text: str) -> str | None:
    """``LanguageId(DEFAULT_LANGUAGES).identify(text)``: the language of ``text`` among the
    ten default languages, or None."""
    from lens_merge.config import DEFAULT_LANGUAGES

    return LanguageId(list(DEFAULT_LANGUAGES)).identify(text)
