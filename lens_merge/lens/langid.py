"""A small, dependency-free language identifier for replies: script first, then stopwords.

Good enough to tell whether a 32-token reply is in the prompt's language among the default
languages (en, zh, ja, ko, ar, bn, sw, es, fr, de); unknown scripts give ``None``.
"""

from __future__ import annotations

import re
import unicodedata

_STOP = {
    "en": "the and is are to of in that it you for with this be on can your have what how "
          "as or not a an do was will my by from there they we",
    "es": "el la los las de que y en un una es por para con no se su al lo como más pero "
          "sus le ya o este sí porque esta entre cuando muy sin sobre también puede",
    "fr": "le la les de des du et est un une que qui pour pas dans en sur au aux ce il elle "
          "vous nous avec sont plus par se ne être avoir",
    "de": "der die das und ist nicht zu den von mit sich des auf für im dem ein eine als auch "
          "es an werden aus er hat dass sie nach wird bei einer um sind oder",
    "sw": "na ya wa kwa ni za katika la kuwa hii ili au lakini kama yake watu sana pia "
          "hiyo huo kila baada kwenye mimi wewe yeye sisi nini jinsi tafadhali",
}
_STOPSETS = {k: set(v.split()) for k, v in _STOP.items()}
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def _script_counts(text: str) -> dict[str, int]:
    c = {"han": 0, "kana": 0, "hangul": 0, "arabic": 0, "bengali": 0, "latin": 0, "other": 0}
    for ch in text:
        if not ch.isalpha():
            continue
        o = ord(ch)
        if 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF:
            c["kana"] += 1
        elif 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF:
            c["han"] += 1
        elif 0xAC00 <= o <= 0xD7AF or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F:
            c["hangul"] += 1
        elif 0x0600 <= o <= 0x06FF or 0x0750 <= o <= 0x077F or 0xFB50 <= o <= 0xFEFF:
            c["arabic"] += 1
        elif 0x0980 <= o <= 0x09FF:
            c["bengali"] += 1
        elif "LATIN" in unicodedata.name(ch, ""):
            c["latin"] += 1
        else:
            c["other"] += 1
    return c


def identify(text: str) -> str | None:
    """Best-guess language code of ``text`` among the default languages, or None."""
    c = _script_counts(text)
    total = sum(c.values())
    if total == 0:
        return None
    top = max(c, key=c.get)
    if top in ("han", "kana"):
        return "ja" if c["kana"] > 0.1 * (c["han"] + c["kana"]) else "zh"
    if top == "hangul":
        return "ko"
    if top == "arabic":
        return "ar"
    if top == "bengali":
        return "bn"
    if top != "latin":
        return None
    words = [w.lower() for w in _WORD.findall(text)]
    scores = {lang: sum(w in s for w in words) for lang, s in _STOPSETS.items()}
    best = max(scores, key=scores.get)
    return best if scores[best] > 0 else None


def matches(text: str, lang: str) -> bool:
    """True when ``text`` is identified as language ``lang``."""
    return identify(text) == lang
