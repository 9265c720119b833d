"""replay/rows.py: the checks an offered batch must pass before anything is written, and every
drawn row checked against the CRC of the tokens it was added with, so a damaged row (or a
rewritten shard, in reference mode) is never replayed."""

import numpy as np
import pytest
from conftest import flip

from cptrain.errors import DataError
from cptrain.replay.rows import check_refs, check_tokens
from replay.test_faults import (
    ROW_LEN,
    assert_all_genuine,
    checkpointed,
    chunk,
    make,
    one_line,
    rows_of,
    train,
)


def test_flipped_byte_in_a_sealed_chunk_is_never_replayed(tmp_path):
    state = checkpointed(tmp_path)
    flip(chunk(tmp_path, 1), 7 * ROW_LEN * 2 + 4)  # row 47 of the buffer
    buf = make(tmp_path, verify_on_resume=False)  # only the per-row checks stand guard
    buf.load_state_dict(state)
    with pytest.raises(DataError) as err:
        for s in range(1000, 1400):
            rows = buf.draw(s, 3, current_task=0)
            assert_all_genuine(rows)
    assert str(chunk(tmp_path, 1)) in one_line(err) and "row 7" in str(err.value)


def test_flipped_byte_during_the_run(tmp_path):
    buf = make(tmp_path)
    train(buf, range(20))
    flip(chunk(tmp_path, 0), 2 * ROW_LEN * 2)
    with pytest.raises(DataError) as err:
        buf.draw(20, 100, current_task=0)  # every row: the damaged one among them
    assert str(chunk(tmp_path, 0)) in one_line(err)
    with pytest.raises(DataError):
        buf.verify()


def test_reference_rows_whose_shard_changed(tmp_path):
    shards = {0: np.concatenate([rows_of(s) for s in range(40)])}
    buf = make(tmp_path, shards=shards)
    train(buf, range(10))
    shards[0][7, 3] += 1  # the "immutable" shard was rewritten
    with pytest.raises(DataError) as err:
        buf.draw(10, 50, current_task=0)
    assert "shards" in one_line(err) and str(chunk(tmp_path, 0)) in str(err.value)


# ---- the checks on an offered batch, directly ---------------------------------------------
def test_offered_rows_must_be_token_ids_of_the_vocabulary_and_the_row_length():
    ok = np.zeros((3, ROW_LEN), dtype=np.int32)
    ok[0, 0] = 99
    check_tokens(ok, row_len=ROW_LEN, vocab_size=100)
    check_tokens(np.zeros((0, ROW_LEN), dtype=np.int64), row_len=ROW_LEN, vocab_size=100)
    for shape in ((3, ROW_LEN + 1), (ROW_LEN,)):
        with pytest.raises(DataError, match="seq_len"):
            check_tokens(np.zeros(shape, dtype=np.int64), row_len=ROW_LEN, vocab_size=100)
    with pytest.raises(ValueError, match="integer token ids"):
        check_tokens(np.zeros((2, ROW_LEN)), row_len=ROW_LEN, vocab_size=100)
    for bad in (-1, 100):
        rows = ok.copy()
        rows[2, 4] = bad
        with pytest.raises(DataError, match=f"token id {bad} is outside the vocabulary"):
            check_tokens(rows, row_len=ROW_LEN, vocab_size=100)


def test_reference_rows_need_one_non_negative_window_index_each():
    rows = np.zeros((3, ROW_LEN), dtype=np.int64)
    refs = check_refs(rows, np.array([[4], [0], [7]], dtype=np.int32))
    assert refs.dtype == np.int64 and refs.tolist() == [4, 0, 7]
    with pytest.raises(ValueError, match="needs refs"):
        check_refs(rows, None)
    for bad in ([1, 2], [1, 2, 3, 4], [1, -2, 3]):
        with pytest.raises(ValueError, match="3 non-negative window indices"):
            check_refs(rows, np.array(bad))
