"""The rows of cptrain's local lm-eval tasks, made from held-out text alone.

Kept apart from the files and the model so that the same documents and seed always give the
same items, whatever lm-eval or the model directory do:

* choice items: HellaSwag-style 4-way choice of the true continuation of a held-out passage;
  the three distractors are spans of the same length in units (words, or characters for scripts
  without spaces) from *other* held-out documents, chosen closest in characters to the true
  ending, so length alone does not give the answer. Given a token budget (the evaluated model's
  ``max_length`` and its tokenizer's counts), every item fits it, so lm-eval never truncates one.
* bits-per-byte documents: held-out documents cut to a bounded length.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cptrain.errors import DataError


@dataclass(frozen=True)
class _Units:
    """A document cut into words (joined by spaces) or, for scripts without spaces, chars."""

    items: list[str]
    joiner: str

    def join(self, a: int, b: int) -> str:
        return self.joiner.join(self.items[a:b])


def _units(text: str, by_char: bool) -> _Units:
    return _Units(list(re.sub(r"\s+", "", text)), "") if by_char else _Units(text.split(), " ")


def spaceless(docs: Sequence[str]) -> bool:
    """Whether the documents are in a script without spaces between words (units are then
    characters, and a document's "word" perplexity is meaningless)."""
    text = "".join(docs[:50])
    return text.count(" ") < len(text) / 25  # Japanese, Chinese: few spaces per character


def make_choice_items(
    docs: Sequence[str],
    *,
    n_items: int = 200,
    seed: int = 0,
    ctx_len: int | None = None,
    end_len: int | None = None,
    candidates: int = 24,
    max_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """HellaSwag-style items and the delimiter between context and ending (" " or "").

    Passages are cut in units (words, or characters for scripts without spaces). With
    ``max_tokens`` and ``count_tokens`` (tokens of a string as the evaluated model's tokenizer
    counts them), every item fits the model's window: an ending keeps at most its share of
    ``max_tokens`` (dropping units from its end, distractors cut to the same number of units),
    then the context loses units from its start until context + delimiter + the longest choice
    take at most ``max_tokens`` tokens; a passage where even one unit of context does not fit
    is left out."""
    by_char = spaceless(docs)
    delim = "" if by_char else " "
    # The default sizes: context + ending within ~100 tokens of a typical tokenizer.
    ctx_len = ctx_len or (72 if by_char else 24)
    end_len = end_len or (24 if by_char else 10)
    units = [_units(d, by_char) for d in docs]
    span = ctx_len + end_len
    usable = [i for i, u in enumerate(units) if len(u.items) >= span]
    if len(usable) < 4 or len({i for i, u in enumerate(units) if len(u.items) >= end_len}) < 4:
        raise DataError(
            f"only {len(usable)} of {len(docs)} held-out document(s) "
            f"{'is' if len(usable) == 1 else 'are'} long enough ({span} "
            f"{'characters' if by_char else 'words'}) for choice items, which need 4; add "
            "validation text"
        )
    budget = None
    if max_tokens is not None:
        if count_tokens is None:
            raise ValueError("max_tokens needs count_tokens (see token_counter)")
        budget = _Budget(max_tokens, count_tokens, delim, end_len / span)
    rng = np.random.default_rng([seed, 0xC401CE])
    # Non-overlapping passages, a few per document, so that no document dominates.
    per_doc = max(1, math.ceil(2 * n_items / len(usable)))
    passages = [
        (d, k * span)
        for d in usable
        for k in range(min(per_doc, len(units[d].items) // span))
    ]
    items: list[dict[str, Any]] = []
    for pos in rng.permutation(len(passages)).tolist():
        if len(items) == n_items:
            break
        d, start = passages[pos]
        u = units[d]
        cut = start + ctx_len  # where the context ends and the ending starts
        n_end = budget.ending_units(u, cut, end_len) if budget else end_len
        ending = u.join(cut, cut + n_end)
        fits = budget.distractor_fits(ending) if budget else None
        distractors = _distractors(units, d, ending, n_end, candidates, rng, fits)
        label = int(rng.integers(4))
        if len(distractors) < 3:
            if budget is None:
                raise DataError(
                    "too few distinct held-out passages for distractors; add validation text"
                )
            continue
        endings = [*distractors[:label], ending, *distractors[label:]]
        first = budget.context_start(u, start, cut, endings) if budget else start
        if first is None:
            continue
        items.append(
            {"id": len(items), "doc": d, "ctx": u.join(first, cut),
             "endings": endings, "label": label}
        )
    if not items:
        raise DataError(
            f"no choice item fits in {max_tokens} tokens of the model's tokenizer; raise "
            "--max-length"
        )
    return items, delim


@dataclass(frozen=True)
class _Budget:
    """Sizes items in tokens of the evaluated model: ``count`` tokens of a whole string (as
    lm-eval encodes context + continuation), ``limit`` of them at most."""

    limit: int
    count: Callable[[str], int]
    delim: str
    end_share: float  # of ``limit``, for an ending

    @property
    def end_limit(self) -> int:
        return max(1, int(self.limit * self.end_share))

    def ending_units(self, u: _Units, cut: int, end_len: int) -> int:
        n = end_len
        while n > 1 and self.count(self.delim + u.join(cut, cut + n)) > self.end_limit:
            n -= 1
        return n

    def distractor_fits(self, ending: str) -> Callable[[str], bool]:
        """A distractor takes no more tokens than the ending's share (or the true ending)."""
        most = max(self.end_limit, self.count(self.delim + ending))
        return lambda span: self.count(self.delim + span) <= most

    def context_start(self, u: _Units, start: int, cut: int, endings: list[str]) -> int | None:
        """The first unit of the longest context ending at ``cut`` with which every choice
        fits (None when not even one unit does); contexts are dropped from the left."""

        def fits(first: int) -> bool:
            ctx = u.join(first, cut)
            return all(self.count(ctx + self.delim + e) <= self.limit for e in endings)

        if fits(start):
            return start
        lo, hi = start, cut - 1  # lo does not fit; find the first that does, if hi does
        if not fits(hi):
            return None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        return hi


def _distractors(
    units: Sequence[_Units], source: int, ending: str, end_len: int, candidates: int,
    rng: np.random.Generator, fits: Callable[[str], bool] | None = None,
) -> list[str]:
    """Up to three spans of other documents, the closest in character length to the true
    ending, among ``candidates`` random spans (that ``fits``, when given)."""
    others = [i for i, u in enumerate(units) if i != source and len(u.items) >= end_len]
    pool: set[str] = set()
    drawn = 0
    for _ in range(8 * candidates):
        if drawn == candidates:
            break
        d = others[int(rng.integers(len(others)))]
        start = int(rng.integers(len(units[d].items) - end_len + 1))
        span = units[d].join(start, start + end_len)
        if fits is not None and not fits(span):
            continue
        drawn += 1
        if span != ending:
            pool.add(span)
    ranked = sorted(sorted(pool), key=lambda s: abs(len(s) - len(ending)))
    return ranked[:3]


def make_bpb_docs(
    docs: Sequence[str], *, n_docs: int = 64, max_chars: int = 2000
) -> list[dict[str, Any]]:
    """Held-out documents cut to ``max_chars`` at a whitespace (bounded evaluation time)."""
    out = []
    for i, text in enumerate(docs[:n_docs]):
        if len(text) > max_chars:
            cut = text.rfind(" ", 0, max_chars)
            text = text[: cut if cut > max_chars // 2 else max_chars]
        out.append({"id": i, "text": text})
    return out
