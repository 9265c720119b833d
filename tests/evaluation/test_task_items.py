"""The rows of cptrain's local lm-eval tasks (``cptrain.evaluation.task_items``): choice items
with the true continuation and length-matched foreign distractors, a function of the seed, cut
in characters for scripts without spaces and fitted to a token budget; bits-per-byte documents
cut at whitespace."""

from __future__ import annotations

import pytest

from cptrain.errors import DataError
from cptrain.evaluation.task_items import make_bpb_docs, make_choice_items


def _docs(n=12, words=200):
    # Every word names its document, so a span's source is visible in the text.
    return [" ".join(f"d{i}w{j % 37}" + "x" * (j % 5) for j in range(words)) for i in range(n)]


def test_choice_items_hold_the_true_continuation_and_foreign_distractors():
    docs = _docs()
    items, delim = make_choice_items(docs, n_items=40, seed=1)
    assert delim == " " and len(items) == 40
    for it in items:
        src = docs[it["doc"]]
        true = it["endings"][it["label"]]
        assert f"{it['ctx']} {true}" in src
        assert len(it["ctx"].split()) == 24 and len(true.split()) == 10
        for k, e in enumerate(it["endings"]):
            if k != it["label"]:
                assert f"d{it['doc']}w" not in e  # from another document
                assert len(e.split()) == 10
                assert abs(len(e) - len(true)) <= 0.25 * len(true)  # length-matched
        assert len(set(it["endings"])) == 4
    labels = [it["label"] for it in items]
    assert all(labels.count(k) >= 4 for k in range(4))  # the answer is not always in one place


def test_choice_items_are_a_function_of_the_seed():
    docs = _docs()
    assert make_choice_items(docs, n_items=20, seed=3) == make_choice_items(docs, n_items=20,
                                                                             seed=3)
    assert make_choice_items(docs, n_items=20, seed=3) != make_choice_items(docs, n_items=20,
                                                                             seed=4)


def test_scripts_without_spaces_are_cut_in_characters():
    docs = ["".join(chr(0x3041 + (i * 7 + j) % 80) for j in range(300)) for i in range(8)]
    items, delim = make_choice_items(docs, n_items=10)
    assert delim == ""
    for it in items:
        assert it["ctx"] + it["endings"][it["label"]] in docs[it["doc"]]
        assert all(len(e) == 24 for e in it["endings"])


def test_too_little_held_out_text_is_a_data_error():
    with pytest.raises(DataError,
                       match=r"only 3 of 3 held-out document\(s\) are long enough .* need 4"):
        make_choice_items(_docs(n=3), n_items=5)


def test_bpb_documents_are_cut_at_whitespace():
    docs = make_bpb_docs(["word " * 1000, "short text"], max_chars=103)
    assert len(docs[0]["text"]) <= 103 and docs[0]["text"].endswith("word")
    assert docs[1]["text"] == "short text"


def _longest(item, delim=" ", count=len):
    return max(count(item["ctx"] + delim + e) for e in item["endings"])


def test_choice_items_within_a_token_budget_fit_it_and_keep_words():
    docs = _docs()
    assert make_choice_items(docs, n_items=20, seed=3, max_tokens=10_000, count_tokens=len) == (
        make_choice_items(docs, n_items=20, seed=3)  # a budget that binds nowhere changes nothing
    )
    items, _ = make_choice_items(docs, n_items=40, seed=1, max_tokens=60, count_tokens=len)
    assert len(items) == 40
    for it in items:
        assert _longest(it) <= 60  # characters stand for tokens here
        true = it["endings"][it["label"]]
        assert f"{it['ctx']} {true}" in docs[it["doc"]]
        assert len({len(e.split()) for e in it["endings"]}) == 1  # same number of words
    with pytest.raises(DataError, match="no choice item fits in 3 tokens"):
        make_choice_items(docs, n_items=5, max_tokens=3, count_tokens=len)
