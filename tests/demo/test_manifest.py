"""The layout of a built demo-corpus language (``cptrain.demo.manifest``): the train/val split
by a hash of the document key alone, topped up to a minimum of validation text."""

from __future__ import annotations

from cptrain.demo import manifest as dm


def _docs(lang: str, n: int) -> list[dm.Document]:
    return [dm.Document(f"src/doc{i}", "src", [f"{lang} text of document {i} " * 5])
            for i in range(n)]


def test_split_is_a_function_of_the_key_alone() -> None:
    en_train, en_val = dm.split_documents(_docs("en", 400), 0.1, min_val_bytes=0)
    fr_docs = list(reversed(_docs("fr", 400)))  # other text, other order
    fr_train, fr_val = dm.split_documents(fr_docs, 0.1, min_val_bytes=0)
    assert {d.doc_id for d in en_val} == {d.doc_id for d in fr_val}
    assert {d.doc_id for d in en_train} == {d.doc_id for d in fr_train}
    assert 20 <= len(en_val) <= 60
    assert all(dm.split_position(d.doc_id) < 0.1 for d in en_val)


def test_split_tops_up_val_in_hash_order_but_keeps_a_train_document() -> None:
    docs = _docs("en", 50)
    train, val = dm.split_documents(docs, 0.05, min_val_bytes=2000)
    val_bytes = sum(len(d.text.encode()) for d in val)
    assert val_bytes >= 2000
    assert val_bytes - len(val[-1].text.encode()) < 2000 or len(val) == 1
    cutoff = max(dm.split_position(d.doc_id) for d in val)
    assert all(dm.split_position(d.doc_id) > cutoff for d in train)
    train, val = dm.split_documents(docs, 0.05, min_val_bytes=10**9)
    assert len(train) == 1 and len(val) == 49
