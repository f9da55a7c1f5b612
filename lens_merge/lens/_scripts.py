"""Scripts of code points and of vocabulary tokens (raw bytes), for choosing the tokens that
show a language's script (``fidelity.indicative_tokens``).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

# Common-use code point ranges of each script. Rare extension blocks are left out on purpose,
# so that a lone UTF-8 lead byte (0xEA: U+A000-AFFF) reads as the one common script it can
# start (Hangul); "symbol" marks blocks that start no language (punctuation, emoji).
SCRIPTS: dict[str, tuple[tuple[int, int], ...]] = {
    "latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF)),
    "greek": ((0x370, 0x3FF), (0x1F00, 0x1FFF)),
    "cyrillic": ((0x400, 0x52F),),
    "armenian": ((0x530, 0x58F),),
    "hebrew": ((0x590, 0x5FF),),
    "arabic": ((0x600, 0x6FF), (0x750, 0x77F), (0x8A0, 0x8FF), (0xFB50, 0xFDFF),
               (0xFE70, 0xFEFF)),
    "devanagari": ((0x900, 0x97F),), "bengali": ((0x980, 0x9FF),),
    "gurmukhi": ((0xA00, 0xA7F),), "gujarati": ((0xA80, 0xAFF),), "oriya": ((0xB00, 0xB7F),),
    "tamil": ((0xB80, 0xBFF),), "telugu": ((0xC00, 0xC7F),), "kannada": ((0xC80, 0xCFF),),
    "malayalam": ((0xD00, 0xD7F),), "sinhala": ((0xD80, 0xDFF),), "thai": ((0xE00, 0xE7F),),
    "lao": ((0xE80, 0xEFF),), "myanmar": ((0x1000, 0x109F),), "georgian": ((0x10A0, 0x10FF),),
    "ethiopic": ((0x1200, 0x139F),), "khmer": ((0x1780, 0x17FF),),
    "hangul": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7FF)),
    "kana": ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F)),
    "han": ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3FFFF)),
    "symbol": ((0x2000, 0x2BFF), (0x3000, 0x303F), (0xE000, 0xF8FF), (0xFE30, 0xFE4F),
               (0xFF00, 0xFF20), (0x1F000, 0x1FAFF)),
}
# Non-Latin languages: (scripts of which one must appear, scripts that must not appear).
LANG_SCRIPTS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    lang: (frozenset(any_of), frozenset(none_of)) for lang, any_of, none_of in [
        ("zh", ("han",), ("kana",)), ("ja", ("kana", "han"), ()), ("ko", ("hangul",), ()),
        *[(c, ("arabic",), ()) for c in ("ar", "fa", "ur", "ps")],
        *[(c, ("cyrillic",), ()) for c in ("ru", "uk", "bg", "be", "kk", "mk", "mn", "sr")],
        ("el", ("greek",), ()), ("he", ("hebrew",), ()), ("hy", ("armenian",), ()),
        *[(c, ("devanagari",), ()) for c in ("hi", "mr", "ne")],
        ("bn", ("bengali",), ()), ("pa", ("gurmukhi",), ()), ("gu", ("gujarati",), ()),
        ("or", ("oriya",), ()), ("ta", ("tamil",), ()), ("te", ("telugu",), ()),
        ("kn", ("kannada",), ()), ("ml", ("malayalam",), ()), ("si", ("sinhala",), ()),
        ("th", ("thai",), ()), ("lo", ("lao",), ()), ("my", ("myanmar",), ()),
        ("ka", ("georgian",), ()), ("am", ("ethiopic",), ()), ("km", ("khmer",), ()),
    ]}


def script_of(cp: int) -> str | None:
    """The script (a ``SCRIPTS`` name) holding code point ``cp``, or None."""
    for name, ranges in SCRIPTS.items():
        if any(lo <= cp <= hi for lo, hi in ranges):
            return name
    return None


def _prefix_range(head: bytes) -> tuple[int, int] | None:
    """Code points a UTF-8 sequence may encode when it starts with the incomplete ``head``
    (None when ``head`` is not an incomplete sequence)."""
    lead = head[0]
    size = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else \
        4 if 0xF0 <= lead <= 0xF4 else 0
    if not size or len(head) >= size or any(not 0x80 <= b < 0xC0 for b in head[1:]):
        return None
    v = lead & (0x7F >> size)
    for b in head[1:]:
        v = (v << 6) | (b & 0x3F)
    rest = 6 * (size - len(head))
    lo = max(v << rest, (0, 0, 0x80, 0x800, 0x10000)[size])
    return lo, min(((v + 1) << rest) - 1, 0x10FFFF)


def token_scripts(raw: bytes) -> set[str]:
    """Scripts a token's bytes show: each complete letter or mark, plus a trailing incomplete
    UTF-8 sequence whose possible code points meet exactly one ``SCRIPTS`` entry (lead bytes
    0xEA-0xED: Hangul; 0xE4-0xE9: Han; 0xD8-0xDB: Arabic; 0xE0 0xA6/0xA7: Bengali; a lone
    0xE0, 0xE1 or 0xE3 starts several scripts and shows none; "symbol" never counts).
    Leading continuation bytes (a token starting inside a character) are skipped."""
    found: set[str] = set()
    for ch in raw.decode("utf-8", errors="replace"):
        if ch != "\ufffd" and unicodedata.category(ch)[0] in "LM":
            s = script_of(ord(ch))
            if s and s != "symbol":
                found.add(s)
    j = len(raw) - 1
    while j >= 0 and len(raw) - j < 4 and 0x80 <= raw[j] < 0xC0:
        j -= 1
    rng = _prefix_range(raw[j:]) if j >= 0 and raw[j] >= 0xC0 else None
    if rng:
        hits = {n for n, rs in SCRIPTS.items()
                if any(lo <= rng[1] and rng[0] <= hi for lo, hi in rs)}
        if len(hits) == 1 and hits != {"symbol"}:
            found |= hits
    return found


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE vocabularies)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs, extra = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """Raw bytes of every vocabulary id (None for added/special tokens), for byte-level BPE
    (GPT-2 style) and SentencePiece (``▁`` = space, ``<0xHH>`` byte fallback) vocabularies."""
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    added |= set(getattr(tokenizer, "all_special_ids", []) or [])
    backend = getattr(tokenizer, "backend_tokenizer", None)
    byte_level = "ByteLevel" in str(getattr(backend, "decoder", "")) or \
        hasattr(tokenizer, "byte_decoder")
    inv = {c: b for b, c in _bytes_to_unicode().items()}
    out: list[bytes | None] = []
    for i, piece in enumerate(pieces):
        if piece is None or i in added:
            out.append(None)
        elif byte_level and all(c in inv for c in piece):
            out.append(bytes(inv[c] for c in piece))
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("▁", " ").encode("utf-8"))
    return out
