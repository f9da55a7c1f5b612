"""lens.langid (lingua) and lens.fidelity: echoes, Wilson intervals, line-level pass rate,
token scripts, indicative tokens, first-token mass."""

from __future__ import annotations

import math

import pytest
import torch

from lens_merge.config import DEFAULT_LANGUAGES
from lens_merge.errors import ConfigError, DataError
from lens_merge.lens._scripts import token_bytes, token_scripts
from lens_merge.lens.fidelity import (
    copied_share,
    first_token_mass,
    indicative_tokens,
    is_echo,
    line_pass_rate,
    wilson,
)
from lens_merge.lens.langid import LanguageId, identify


@pytest.fixture(scope="module")
def lid() -> LanguageId:
    return LanguageId(list(DEFAULT_LANGUAGES))


# --- language identification -------------------------------------------------------------

@pytest.mark.parametrize("text, lang", [
    ("Certainly! Here are some tips for a good night's sleep.", "en"),
    ("海水是咸的，因为河流把矿物质带进了大海。", "zh"),
    ("東京は日本の首都です", "ja"),
    ("바닷물이 짠 이유는 소금 때문입니다.", "ko"),
    ("مرحبا، كيف حالك اليوم؟", "ar"),
    ("পাইথন একটি প্রোগ্রামিং ভাষা", "bn"),
    ("Habari yako, rafiki yangu?", "sw"),
    ("El mar es salado porque los ríos llevan minerales.", "es"),
    ("La mer est salée parce que les rivières apportent des minéraux.", "fr"),
    ("Das Meer ist salzig, weil Flüsse Mineralien hineintragen.", "de"),
    # mixed scripts: the script with more words decides (module docstring)
    ("저는 Python을 좋아합니다", "ko"),
    ("Python是一种编程语言，很好用", "zh"),
    ("Tokyo は日本の首都です", "ja"),
    ("Python هو لغة برمجة", "ar"),
    ("我喜欢 machine learning 和 deep learning", "en"),
])
def test_identify_each_default_language_and_mixed_scripts(lid, text, lang):
    assert lid.identify(text) == lang
    assert identify(text) == lang  # the module-level helper on the default languages


@pytest.mark.parametrize("text", ["", "   ", "123 456", "---\n***", "\ufffd\ufffd", "3.14 + 2"])
def test_no_letters_no_verdict(lid, text):
    assert lid.identify(text) is None
    assert not lid.lines_in(text, "en")
    assert set(lid.confidences(text).values()) == {0.0}


def test_low_confidence_gives_none_and_confidences_sum_to_one(lid):
    conf = lid.confidences("Sure!")
    assert math.isclose(sum(conf.values()), 1.0, abs_tol=1e-6)
    assert max(conf.values()) < 0.5 and lid.identify("Sure!") is None
    assert LanguageId(list(DEFAULT_LANGUAGES), min_confidence=0.0).identify("Sure!") is not None


def test_detector_is_built_once_per_language_set():
    a, b = LanguageId(["en", "zh"]), LanguageId(["zh", "EN", "en"])
    assert a._det is b._det and a.languages == ("en", "zh")
    assert LanguageId(["en", "de"])._det is not a._det


@pytest.mark.parametrize("langs, msg", [
    (["en", "xx"], "language 'xx': unknown to the language identifier"),
    (["en"], "at least two languages"),
    (["en", "en"], "at least two languages"),
])
def test_bad_language_sets_name_the_code(langs, msg):
    with pytest.raises(ConfigError, match=msg):
        LanguageId(langs)


def test_lines_in_rejects_a_language_outside_the_set(lid):
    with pytest.raises(ConfigError, match="'it': not one of the identifier's languages"):
        lid.lines_in("Ciao", "it")


@pytest.mark.parametrize("reply, lang, ok", [
    ("Sure!\nCertainly! Here are some tips:\n1. Drink water every day.", "en", True),
    ("El mar es salado porque los ríos llevan minerales.\n"
     "The sea is salty because rivers carry minerals.", "es", False),
    ("OK\nEl mar es salado porque los ríos llevan minerales al océano.", "es", True),
    ("Here is the code:\n```python\ndef f(x):\n    return x\n```\nIt returns its argument.",
     "en", True),
    ("바닷물이 짠 이유는 소금 때문입니다.\n2. 강물이 광물을 바다로 운반합니다.\n\n3.", "ko", True),
    ("海水是咸的，因为河流把矿物质带进了大海。\nThe sea is salty because of minerals.", "zh",
     False),
    ("The answer to this question is a classic example of a philosophical concept.", "zh", False),
    ("OK", "es", False),  # one short line: the whole reply's top language (sw) decides
    ("", "en", False),
])
def test_lines_in_is_the_lcb_line_level_check(lid, reply, lang, ok):
    assert lid.lines_in(reply, lang) is ok


# --- echoes ------------------------------------------------------------------------------

@pytest.mark.parametrize("reply, prompt, share", [
    ("바닷물이 왜 짠지 쉬운 말로 \ufffd", "바닷물이 왜 짠지 쉬운 말로 설명해 주세요.", 1.0),
    ("شرح بكلمات بسيطة لماذا يكون طعم", "اشرح بكلمات بسيطة لماذا يكون طعم البحر مالحًا.", 1.0),
    ("用简单的话解释一下为什么海水是咸的。", "用简单的话解释一下为什么海水是咸的。", 1.0),
    ("海の水がしょっぱい理由を簡単な言葉で",
     "海の水がしょっぱい理由を簡単な言葉で説明してください。", 1.0),
    ("EXPLAIN   in simple words why the sea\ntastes salty", "Explain in simple words why the "
     "sea tastes salty.", 1.0),
    ("Hi", "Hi", 1.0),
])
def test_copies_of_the_prompt_are_echoes(reply, prompt, share):
    assert copied_share(reply, prompt) == pytest.approx(share)
    assert is_echo(reply, prompt)


@pytest.mark.parametrize("reply, prompt, share", [
    ("The capital of France is Paris.", "What is the capital of France?", 21 / 31),
    ("La mer a un goût salé est une jeune monde.",
     "Explique avec des mots simples pourquoi la mer a un goût salé.", 21 / 42),
    ("海水是咸的，因为海水里溶解了很多盐。", "用简单的话解释一下为什么海水是咸的。", 0.0),
    ("একরেন একরেন একরেন", "সমুদ্রের পানি কেন লবণাক্ত লাগে, সহজ ভাষায় ব্যাখ্যা করো।", 0.0),
    ("Explain in simple words why the sea tastes salty. The sea is salty because rivers carry "
     "dissolved minerals into it over millions of years.",
     "Explain in simple words why the sea tastes salty.", 50 / 119),
    ("Hello! How can I help you today?", "Hi", 0.0),
    ("", "Hi", 0.0),
])
def test_answers_are_not_echoes(reply, prompt, share):
    assert copied_share(reply, prompt) == pytest.approx(share, abs=1e-3)
    assert not is_echo(reply, prompt)


# --- Wilson interval and line-level pass rate --------------------------------------------

@pytest.mark.parametrize("k, n, lo, hi", [
    (8, 16, 0.27999, 0.72001),  # p = 1/2: centre 1/2, half-width 0.22000
    (0, 16, 0.0, 3.8416 / 19.8416),  # upper bound z^2 / (n + z^2)
    (16, 16, 16 / 19.8416, 1.0),
    (3, 48, 0.021483, 0.168357),
    (0, 0, 0.0, 1.0),
])
def test_wilson_known_values(k, n, lo, hi):
    assert wilson(k, n) == pytest.approx((lo, hi), abs=1e-5)


@pytest.mark.parametrize("k, n", [(1, 2), (5, 16), (13, 48), (40, 50)])
def test_wilson_bounds_solve_the_score_equation(k, n):
    z, p = 1.96, k / n
    for bound in wilson(k, n):
        assert (p - bound) ** 2 == pytest.approx(z * z * bound * (1 - bound) / n, rel=1e-9)


@pytest.mark.parametrize("k, n", [(-1, 4), (5, 4)])
def test_wilson_rejects_impossible_counts(k, n):
    with pytest.raises(DataError, match=f"k={k}, n={n}"):
        wilson(k, n)


def test_line_pass_rate_counts_echoes_as_failures(lid):
    prompts = ["Explica con palabras sencillas por qué el mar sabe salado."] * 4
    replies = ["El mar es salado porque los ríos llevan minerales al océano.",
               "Explica con palabras sencillas por qué el mar sabe salado.",  # echo, in es
               "The sea is salty because rivers carry minerals.",
               "Los océanos contienen sal disuelta de las rocas."]
    r = line_pass_rate(replies, prompts, "es", lid)
    assert r["outcomes"] == ["pass", "echo", "fail", "pass"]
    assert (r["n"], r["passed"], r["echoes"]) == (4, 2, 1)
    assert r["rate"] == 0.5 and r["echo"] == 0.25 and r["ci"] == wilson(2, 4)
    empty = line_pass_rate([], [], "es", lid)
    assert math.isnan(empty["rate"]) and empty["ci"] == (0.0, 1.0) and empty["n"] == 0
    with pytest.raises(DataError, match="2 replies for 1 prompts"):
        line_pass_rate(["a", "b"], ["a"], "es", lid)


# --- token scripts and indicative tokens -------------------------------------------------

@pytest.mark.parametrize("raw, scripts", [
    (b"\xea", {"hangul"}), (b"\xeb", {"hangul"}), (b"\xed", {"hangul"}),  # U+A000-DFFF leads
    (b"\xe5", {"han"}), (b" \xe4\xb8", {"han"}), ("的".encode(), {"han"}),
    (b"\xe3\x81", {"kana"}), ("の".encode(), {"kana"}),
    (b"\xe3", set()),  # U+3000-3FFF: CJK punctuation, kana, Hangul jamo, Han: ambiguous
    (b"\xd8", {"arabic"}), ("ال".encode(), {"arabic"}),
    (b"\xe0\xa6", {"bengali"}), (b"\xe0", set()), (b"\xe0\xa4", {"devanagari"}),
    (b"\xf0", set()), (b"\xf0\x9f", set()),  # emoji lead bytes start no language
    (b" la", {"latin"}), ("é".encode(), {"latin"}), (b"123", set()), (b"\xb0\x80", set()),
    ("la的".encode(), {"latin", "han"}),
])
def test_token_scripts_of_bytes(raw, scripts):
    assert token_scripts(raw) == scripts


@pytest.fixture(scope="module")
def tiny_tok(tiny_tokenizer_dir):
    from lens_merge.models import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


def test_token_bytes_rebuild_the_text(tiny_tok):
    raw = token_bytes(tiny_tok)
    assert len(raw) == len(tiny_tok) and raw[tiny_tok.eos_token_id] is None
    for text in ["Hello, world!", "바닷물이 왜 짠지", "海の水がしょっぱい", " ¿Cuánto tiempo?"]:
        ids = tiny_tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(raw[i] for i in ids) == text.encode("utf-8")


def test_token_bytes_of_sentencepiece_pieces():
    class Piece:
        all_special_ids = [0]
        added_tokens_decoder: dict = {}

        def __len__(self):
            return 4

        def convert_ids_to_tokens(self, ids):
            return ["<s>", "▁la", "<0xEA>", "casa"]

    assert token_bytes(Piece()) == [None, b" la", b"\xea", b"casa"]


def test_indicative_tokens_by_script(tiny_tok):
    from lens_merge.data import load_prompts

    held = load_prompts("default", DEFAULT_LANGUAGES, split="heldout")
    texts = {lang: [] for lang in ("zh", "ja", "ko", "ar", "bn")}
    ind = indicative_tokens(tiny_tok, texts)
    assert list(ind) == list(texts)
    raw = token_bytes(tiny_tok)
    for lang, ids in ind.items():
        assert ids == sorted(ids) and ids
        firsts = [tiny_tok(t, add_special_tokens=False)["input_ids"][0] for t in held.texts(lang)]
        covered = sum(f in set(ids) for f in firsts) / len(firsts)
        assert covered >= 0.9, (lang, covered)  # a prompt's first token shows its script
    assert not any(token_scripts(raw[i]) & {"kana"} for i in ind["zh"])
    assert all(token_scripts(raw[i]) & {"kana", "han"} for i in ind["ja"])
    assert set(ind["zh"]) < set(ind["ja"])  # every Han-only token counts for both


def test_indicative_tokens_latin_rule_on_counts(tiny_tok):
    texts = {"en": ["Yes, the house is big and the garden is green."] * 4,
             "es": ["Sí, la casa es grande y el jardín es verde."] * 4 + ["Hola mundo."] * 2,
             "fr": ["Oui, la maison est grande et le jardin est vert."] * 4}
    ind = indicative_tokens(tiny_tok, texts)
    raw = token_bytes(tiny_tok)

    def first(word: str) -> int:
        return tiny_tok(word, add_special_tokens=False)["input_ids"][0]

    assert first(" casa") in ind["es"] and first(" el") in ind["es"]
    assert first(" the") in ind["en"] and first(" the") not in ind["es"] + ind["fr"]
    for shared in (" la", " grande", " jardin"):  # in es and fr: indicative of neither
        assert first(shared) not in ind["es"] + ind["fr"], shared
    assert first(" mundo") not in ind["es"]  # two occurrences: below MIN_COUNT (3)
    # every vocabulary variant of an indicative key is in (" el", "el", " El", "El", ...)
    el = raw[first(" el")].decode().lstrip().casefold()
    variants = [i for i, b in enumerate(raw)
                if b is not None and b.decode("utf-8", "replace").lstrip().casefold() == el]
    assert len(variants) >= 2 and set(variants) <= set(ind["es"])
    assert all(ids == sorted(ids) for ids in ind.values())
    assert indicative_tokens(tiny_tok, texts) == ind  # deterministic


def test_indicative_tokens_errors(tiny_tok):
    with pytest.raises(DataError, match="no texts for 'en'"):
        indicative_tokens(tiny_tok, {"es": ["hola"] * 3, "ko": []})
    with pytest.raises(ConfigError, match="language 'xx'"):
        indicative_tokens(tiny_tok, {"en": ["hi"], "xx": ["?"]})
    only_en = indicative_tokens(tiny_tok, {"en": [], "ko": []})  # no other Latin language
    raw = token_bytes(tiny_tok)
    assert only_en["en"] and all("latin" in token_scripts(raw[i]) for i in only_en["en"])


# --- first-token mass --------------------------------------------------------------------

def test_first_token_mass_sums_softmax_in_fp64():
    logits = torch.zeros(2, 8)
    logits[1, 3] = 10.0
    m = first_token_mass(logits, [3, 5, 3])  # a duplicate id counts once
    assert m.dtype == torch.float64 and m.shape == (2,)
    assert m[0].item() == pytest.approx(2 / 8)
    e = math.exp(10.0)
    assert m[1].item() == pytest.approx((e + 1) / (e + 7))
    assert first_token_mass(logits, []).tolist() == [0.0, 0.0]
    assert first_token_mass(logits, range(8)).tolist() == pytest.approx([1.0, 1.0])


def test_first_token_mass_checks_shapes_and_ids():
    with pytest.raises(DataError, match=r"\[n, V\]"):
        first_token_mass(torch.zeros(8), [1])
    with pytest.raises(DataError, match=r"\[0, 8\)"):
        first_token_mass(torch.zeros(2, 8), [8])
