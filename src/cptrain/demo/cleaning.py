"""Paragraph cleaning for the demo corpus: the filters every rendered document goes through
(length, table-of-contents lines, language ID by script share or stopwords) and exact
de-duplication within a language.

Kept apart from the build because it is pure text in, text out: the worker processes run it,
the packaged corpora reuse it, and its thresholds (``CleaningParams``) go into every manifest.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class CleaningParams:
    """Thresholds of the paragraph filter; recorded in every manifest."""

    min_chars: int = 80
    min_chars_cjk: int = 40
    min_script_share: float = 0.5
    min_stopword_ratio: float = 0.07
    min_code_bytes: int = 200


CJK_LANGUAGES = frozenset({"ja", "zh"})
SCRIPT_LANGUAGES = frozenset({"ar", "ja", "zh"})

# Frequent function words per language. A word listed for several languages (fr/es "la",
# de/en "in") counts for each of them in equal parts, so it supports a Latin-script language
# against English without telling French from Spanish.
_STOPWORDS_RAW = {
    "en": """the of and to a in is that for it with as was on be by this are or from an which
        you not can if will has have at these when into your its their there been would should
        they what other than then also only such may must does all more each some any how do
        no use where so but one we""",
    "fr": """le la les de des du un une et est en que qui pour dans sur par pas au aux ce cette
        ces avec sont ou être peut vous il elle ne se plus son sa ses leur nous lorsque mais
        comme tout tous été sans dont où lui votre vos même aussi très fait doit si a on entre
        selon afin ils elles""",
    "de": """der die das und ist nicht ein eine einen einem dem den des mit von zu auf für im
        in sich werden wird auch oder als bei wenn nur kann sie es dass aus einer eines diese
        dieser sind um wie noch durch über nach können muss haben hat man zum zur kein
        keine""",
    "es": """el la los las de del y que en un una es por para con se no su sus al lo como más
        este esta puede o ser son cuando también pero hay están sobre otro otros muy ya desde
        hasta a si entre le les usted""",
}


def _stopword_weights() -> dict[str, dict[str, float]]:
    """{word: {language: weight}}; a word shared by k languages weighs 1/k in each."""
    owners: dict[str, list[str]] = {}
    for lang, words in _STOPWORDS_RAW.items():
        for word in dict.fromkeys(words.split()):
            owners.setdefault(word, []).append(lang)
    return {w: {lang: 1 / len(langs) for lang in langs} for w, langs in owners.items()}


STOPWORD_WEIGHTS = _stopword_weights()
LATIN_LANGUAGES = tuple(_STOPWORDS_RAW)
_WORD = re.compile(r"[^\W\d_]+")
_DOT_LEADER = re.compile(r"(?:\.\s?){4,}|…{2,}|(?:·\s?){4,}")
# "1. Intro", "2.3 Usage": a number with at least one dot, then a capitalised word.
_NUMBERED_HEADING = re.compile(r"(?<!\S)(?=\d+\.)\d+(?:\.\d+)*\.?\s+(\w)")
_CJK_GAP = re.compile(
    r"(?<=[\u3000-\u30ff\u3400-\u9fff\uff00-\uffef]) (?=[\u3000-\u30ff\u3400-\u9fff\uff00-\uffef])"
)


def is_toc_line(line: str) -> bool:
    """Table-of-contents-like: dot leaders, mostly numbers, or several numbered headings."""
    if _DOT_LEADER.search(line):
        return True
    tokens = line.split()
    if not tokens:
        return False
    numeric = sum(1 for t in tokens if any(c.isdigit() for c in t) and not _WORD.search(t))
    if numeric / len(tokens) >= 0.5:
        return True
    headings = [m for m in _NUMBERED_HEADING.finditer(line) if m.group(1)[0].isupper()]
    return len(headings) >= 3


def _script_counts(text: str) -> tuple[int, int, int, int, int]:
    """(letters, CJK ideographs, kana, Arabic letters, runs of other letters) in ``text``."""
    letters = han = kana = arabic = other_runs = 0
    in_run = False
    for ch in text:
        if not ch.isalpha():
            in_run = False
            continue
        letters += 1
        o = ord(ch)
        if 0x3400 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF:
            han += 1
        elif 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0xFF66 <= o <= 0xFF9D:
            kana += 1
        elif 0x0600 <= o <= 0x06FF or 0x0750 <= o <= 0x077F or 0xFB50 <= o <= 0xFEFF:
            arabic += 1
        else:
            other_runs += not in_run
            in_run = True
            continue
        in_run = False
    return letters, han, kana, arabic, other_runs


def script_share(text: str, language: str) -> float:
    """Share of the text written in the script of ``language`` (ar, ja or zh).

    Arabic is measured in letters; CJK in characters against whole foreign *words*, because
    one ideograph carries about as much as one Latin word and translated technical prose
    keeps many command names."""
    letters, han, kana, arabic, other_runs = _script_counts(text)
    if language == "ar":
        return arabic / letters if letters else 0.0
    if language == "ja":
        # Without any kana a CJK paragraph is Chinese, not Japanese.
        return (han + kana) / (han + kana + other_runs) if kana else 0.0
    if kana > 0.05 * (han + kana):  # Japanese quoted in a Chinese page
        return 0.0
    return han / (han + other_runs) if han else 0.0


def stopword_scores(text: str) -> tuple[int, dict[str, float]]:
    """(number of words, {language: weighted count of its stopwords})."""
    words = _WORD.findall(text.lower())
    scores = dict.fromkeys(LATIN_LANGUAGES, 0.0)
    for word in words:
        for lang, weight in STOPWORD_WEIGHTS.get(word, {}).items():
            scores[lang] += weight
    return len(words), scores


def is_language(text: str, language: str, params: CleaningParams = CleaningParams()) -> bool:
    """Language-ID filter: script share for ar/ja/zh, stopword ratio for Latin scripts."""
    if language in SCRIPT_LANGUAGES:
        return script_share(text, language) >= params.min_script_share
    n_words, hits = stopword_scores(text)
    own = hits[language]
    if not n_words or own / n_words < params.min_stopword_ratio:
        return False
    # Ties are kept: French and Spanish can share every function word of a short paragraph.
    return own > 0 and all(own >= n for lang, n in hits.items() if lang != language)


def normalize_paragraph(text: str, language: str) -> str:
    """NFC, trimmed lines, single spaces; CJK loses the spaces groff puts at line joins."""
    text = unicodedata.normalize("NFC", text)
    lines = (" ".join(line.split()) for line in text.splitlines())
    text = "\n".join(line for line in lines if line)
    return _CJK_GAP.sub("", text) if language in CJK_LANGUAGES else text


def clean_paragraphs(
    raw: str, language: str, params: CleaningParams = CleaningParams()
) -> list[str]:
    """Paragraphs of one document that pass the filters (de-dup happens across documents)."""
    min_chars = params.min_chars_cjk if language in CJK_LANGUAGES else params.min_chars
    kept = []
    for block in re.split(r"\n\s*\n", raw):
        lines = normalize_paragraph(block, language).split("\n")
        text = "\n".join(ln for ln in lines if ln and not is_toc_line(ln))
        if len(text) >= min_chars and is_language(text, language, params):
            kept.append(text)
    return kept


def clean_code(raw: str, params: CleaningParams = CleaningParams()) -> list[str]:
    """A .py file is one paragraph, kept whole when it has at least ``min_code_bytes``."""
    return [raw] if len(raw.encode("utf-8")) >= params.min_code_bytes else []


class Deduplicator:
    """Exact de-duplication of paragraphs within one language (first occurrence wins)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def keep(self, paragraphs: Iterable[str]) -> list[str]:
        kept = []
        for p in paragraphs:
            key = hashlib.blake2b(p.encode("utf-8"), digest_size=16).digest()
            if key not in self._seen:
                self._seen.add(key)
                kept.append(p)
        return kept
