"""Token shards: text round trip, dtype choice, windows, integrity checks and crash safety."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from cptrain.data.shards import ShardSet, ShardWriter, shard_dtype
from cptrain.data.tokenizer import EOS_TOKEN, train_tokenizer
from cptrain.errors import DataError

DOCS = [
    "Once upon a time, there was a fox.",
    "Il était une fois un renard. <|endoftext|> stays text here.",
    "Es war einmal ein Fuchs — 狐 🦊",
    "",
    "def f(x):\n    return x * 2\n",
] * 4
SHA = "f" * 64


def write(path: Path, docs: list[np.ndarray], vocab: int = 1000, eos: int = 0,
          per_file: int = 10) -> dict:
    with ShardWriter(path, vocab, eos, SHA, max_tokens_per_file=per_file) as w:
        for ids in docs:
            w.append(ids)
        return w.close()


def counting_docs(lengths: list[int]) -> list[np.ndarray]:
    """Documents of ids 1, 2, 3, ... so every token in the stream is distinct from EOS=0."""
    out, nxt = [], 1
    for n in lengths:
        out.append(np.arange(nxt, nxt + n))
        nxt += n
    return out


def test_tokens_round_trip_to_text(tmp_path: Path) -> None:
    tok = train_tokenizer(DOCS * 5, 300, tmp_path / "tok")
    backend = tok.backend_tokenizer
    backend.encode_special_tokens = True  # a literal EOS string inside a document is text
    encoded = [np.array(e.ids) for e in backend.encode_batch(DOCS, add_special_tokens=False)]
    manifest = write(tmp_path / "split", encoded, vocab=len(tok), eos=tok.eos_token_id,
                     per_file=37)
    shards = ShardSet(tmp_path / "split")
    stream = shards.read(0, shards.num_tokens)
    assert tok.decode(stream.tolist()) == EOS_TOKEN.join(DOCS) + EOS_TOKEN
    assert int((stream == tok.eos_token_id).sum()) == len(DOCS)
    assert shards.num_documents == len(DOCS) == manifest["num_documents"]
    assert shards.num_tokens == sum(len(e) + 1 for e in encoded)
    assert len(shards.files) > 1


def test_manifest_describes_the_files(tmp_path: Path) -> None:
    manifest = write(tmp_path / "split", counting_docs([7, 12, 4]), per_file=10)
    on_disk = json.loads((tmp_path / "split" / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["format"] == "cptrain-shards-v1"
    assert manifest["num_tokens"] == 26 and manifest["num_documents"] == 3
    assert [f["name"] for f in manifest["files"]] == [
        "shard_00000.bin", "shard_00001.bin", "shard_00002.bin"]
    assert [f["num_tokens"] for f in manifest["files"]] == [10, 10, 6]
    for f in manifest["files"]:
        data = (tmp_path / "split" / f["name"]).read_bytes()
        assert len(data) == f["num_tokens"] * 2
        assert hashlib.sha256(data).hexdigest() == f["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]  # temp dir renamed away


@pytest.mark.parametrize("vocab,dtype", [(300, np.uint16), (65536, np.uint16),
                                         (65537, np.uint32), (200_000, np.uint32)])
def test_dtype_choice(vocab: int, dtype: type) -> None:
    assert shard_dtype(vocab) == np.dtype(dtype)


def test_uint32_shards_keep_large_ids(tmp_path: Path) -> None:
    docs = [np.array([70_000, 1, 199_999]), np.array([65_536])]
    write(tmp_path / "split", docs, vocab=200_000, eos=5, per_file=100)
    shards = ShardSet(tmp_path / "split")
    assert shards.dtype == np.uint32
    assert (tmp_path / "split" / "shard_00000.bin").stat().st_size == 6 * 4
    assert shards.read(0, 6).tolist() == [70_000, 1, 199_999, 5, 65_536, 5]


def test_windows_values_shapes_and_no_straddling(tmp_path: Path) -> None:
    write(tmp_path / "split", counting_docs([9, 14, 3, 20]), per_file=11)  # 50 tokens
    shards = ShardSet(tmp_path / "split", name="en")
    sizes = [f["num_tokens"] for f in shards.files]
    assert sizes == [11, 11, 11, 11, 6]
    file_of_token = np.repeat(np.arange(len(sizes)), sizes)
    stream = shards.read(0, shards.num_tokens)
    for window_len in (1, 3, 4, 6, 11):
        expected = []  # built from the flat stream, cutting each file separately
        start = 0
        for size in sizes:
            expected += [stream[start + k * window_len: start + (k + 1) * window_len]
                         for k in range(size // window_len)]
            start += size
        n = shards.num_windows(window_len)
        assert n == len(expected) == sum(s // window_len for s in sizes)
        rng = np.random.default_rng(window_len)
        idx = rng.integers(0, n, size=64)
        got = shards.windows(idx, window_len)
        assert got.shape == (64, window_len) and got.dtype == np.int64
        assert np.array_equal(got, np.stack([expected[i] for i in idx]))
        assert np.array_equal(shards.window(n - 1, window_len), expected[-1])
        positions = [int(np.flatnonzero(stream == w[0])[0]) for w in got if w[0] != 0]
        for pos in positions:  # every window lies inside one file
            assert file_of_token[pos] == file_of_token[pos + window_len - 1]


def test_single_file_windows(tmp_path: Path) -> None:
    write(tmp_path / "split", counting_docs([30]), per_file=1000)
    shards = ShardSet(tmp_path / "split")
    got = shards.windows(np.array([4, 0, 4]), 6)
    assert got.tolist() == [list(range(25, 31)), list(range(1, 7)), list(range(25, 31))]
    assert shards.windows([], 6).shape == (0, 6)


def test_too_few_tokens_for_one_window(tmp_path: Path) -> None:
    write(tmp_path / "split", counting_docs([5]), per_file=100)
    shards = ShardSet(tmp_path / "split", name="fr")
    assert shards.num_windows(6) == 1
    with pytest.raises(DataError, match="task fr has 6 tokens, fewer than one window of 7"):
        shards.num_windows(7)
    with pytest.raises(DataError, match="lower train.seq_len or add data"):
        shards.windows([0], 7)


def test_out_of_range_indices(tmp_path: Path) -> None:
    write(tmp_path / "split", counting_docs([19]), per_file=100)
    shards = ShardSet(tmp_path / "split")
    with pytest.raises(IndexError):
        shards.windows([5], 4)
    with pytest.raises(IndexError):
        shards.windows([-1], 4)
    with pytest.raises(IndexError):
        shards.read(15, 6)


def test_read_across_files(tmp_path: Path) -> None:
    write(tmp_path / "split", counting_docs([25]), per_file=7)
    shards = ShardSet(tmp_path / "split")
    assert shards.read(5, 12).tolist() == list(range(6, 18))
    assert shards.read(0, 26).tolist() == [*range(1, 26), 0]


def test_truncated_and_missing_files_are_detected(tmp_path: Path) -> None:
    write(tmp_path / "split", counting_docs([30]), per_file=10)
    second = tmp_path / "split" / "shard_00001.bin"
    second.write_bytes(second.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"shard_00001.bin is truncated \(expected 20 bytes, "
                                        r"found 17\); re-run `cptrain prepare`"):
        ShardSet(tmp_path / "split")
    second.unlink()
    with pytest.raises(DataError, match="shard_00001.bin is missing"):
        ShardSet(tmp_path / "split")


def test_missing_or_malformed_manifest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        ShardSet(tmp_path / "nowhere")
    write(tmp_path / "split", counting_docs([5]))
    manifest = tmp_path / "split" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["num_tokens"] += 1
    manifest.write_text(json.dumps(data))
    with pytest.raises(DataError, match="malformed"):
        ShardSet(tmp_path / "split")
    manifest.unlink()
    with pytest.raises(DataError, match="has no manifest.json"):
        ShardSet(tmp_path / "split")


def test_full_verify_catches_changed_bytes(tmp_path: Path) -> None:
    write(tmp_path / "split", counting_docs([30]), per_file=100)
    shards = ShardSet(tmp_path / "split")
    shards.verify(full=True)
    file = tmp_path / "split" / "shard_00000.bin"
    data = bytearray(file.read_bytes())
    data[4] ^= 0xFF
    file.write_bytes(bytes(data))
    shards.verify(full=False)  # same size: the quick check cannot see it
    with pytest.raises(DataError, match="corrupt"):
        shards.verify(full=True)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "split", 100, 0, SHA) as w:
        w.append(np.arange(1, 50))
        raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []


def test_unfinished_split_is_not_readable(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "split", 100, 0, SHA, max_tokens_per_file=10)
    w.append(np.arange(1, 50))  # files exist under the temporary name only
    with pytest.raises(DataError):
        ShardSet(tmp_path / "split")
    w.close()
    assert ShardSet(tmp_path / "split").num_tokens == 50


def test_rewrite_replaces_the_old_split(tmp_path: Path) -> None:
    write(tmp_path / "split", counting_docs([40]), per_file=10)
    write(tmp_path / "split", counting_docs([4]), per_file=10)
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == [
        "manifest.json", "shard_00000.bin"]
    assert ShardSet(tmp_path / "split").num_tokens == 5


def test_ids_outside_vocab_are_refused(tmp_path: Path) -> None:
    with ShardWriter(tmp_path / "split", 100, 0, SHA) as w, pytest.raises(DataError):
        w.append(np.array([3, 100]))


def test_pickle_reopens_memmaps(tmp_path: Path) -> None:
    write(tmp_path / "split", counting_docs([40]), per_file=16)
    shards = ShardSet(tmp_path / "split", name="en")
    copy = pickle.loads(pickle.dumps(shards))
    assert len(pickle.dumps(shards)) < 1000  # not the token data
    assert np.array_equal(copy.windows([0, 3], 5), shards.windows([0, 3], 5))
    assert copy.name == "en"
