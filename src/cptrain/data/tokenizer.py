"""Byte-level BPE tokenizers: train offline, save and load as Hugging Face fast tokenizers.

A trained tokenizer has one special token, ``<|endoftext|>``, used as EOS between documents and
as BOS/PAD where Hugging Face code asks for one. ``tokenizer_sha256`` fingerprints a tokenizer so
token shards can be tied to the tokenizer that produced them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cptrain import fsutil
from cptrain.errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
MIN_VOCAB_SIZE = 257  # 256 byte symbols + EOS
DEFAULT_MAX_BYTES = 50_000_000
# Tried in order when a tokenizer does not name its EOS (e.g. a bare tokenizer.json).
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
# Runtime state, not vocabulary: Hugging Face code toggles these on the backend.
_VOLATILE_KEYS = ("truncation", "padding")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on at most ``max_bytes`` UTF-8 bytes of ``texts``, save, return it.

    The caller balances corpora (e.g. an equal share of ``max_bytes`` per task); here the stream
    is only cut off once the total is reached. The vocabulary can end up smaller than
    ``vocab_size`` when the text has too few distinct pairs: use ``len(tok)``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not MIN_VOCAB_SIZE <= vocab_size < 2**32:
        raise ConfigError(
            f"vocab_size {vocab_size} is out of range; byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {EOS_TOKEN})"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    used = [0]
    backend.train_from_iterator(_capped(texts, max_bytes, used), trainer=trainer)
    if used[0] == 0:
        raise DataError("no text to train the tokenizer on; give the tasks non-empty train inputs")
    tok = _wrap(backend)
    save_tokenizer(tok, out_dir)
    return tok


def save_tokenizer(tok: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """``save_pretrained`` into a temporary sibling, then swap it in as a whole."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = fsutil.temp_sibling(out_dir)
    try:
        tok.save_pretrained(str(tmp))
        fsutil.fsync_tree(tmp)
        fsutil.replace_dir(tmp, out_dir)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Load a ``tokenizer.json`` file or a Hugging Face tokenizer directory; it must have EOS."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not path.exists():
        raise DataError(
            f"tokenizer {path} does not exist; point tokenizer.path at a tokenizer.json file "
            "or a Hugging Face tokenizer directory"
        )
    if path.is_dir() and not (path / "tokenizer.json").is_file():
        raise DataError(
            f"tokenizer directory {path} has no tokenizer.json; save a fast tokenizer there "
            "(save_pretrained) or point at a tokenizer.json file"
        )
    try:
        if path.is_dir():
            tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
        else:
            tok = PreTrainedTokenizerFast(
                tokenizer_file=str(path), clean_up_tokenization_spaces=False
            )
    except Exception as exc:  # tokenizers/transformers raise plain Exception on bad JSON
        raise DataError(f"{path} is not a valid tokenizer ({_first_line(exc)}); "
                        "re-create it or point at another tokenizer") from None
    _ensure_eos(tok, path)
    return tok


def tokenizer_sha256(tok: Any) -> str:
    """sha256 of the canonical tokenizer.json content (key order and runtime settings ignored)."""
    backend = getattr(tok, "backend_tokenizer", tok)
    data = json.loads(backend.to_str())
    for key in _VOLATILE_KEYS:
        data.pop(key, None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _wrap(backend: Any) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def _capped(texts: Iterable[str], max_bytes: int, used: list[int]) -> Iterator[str]:
    """Yield texts until ``max_bytes`` UTF-8 bytes; the last one is cut to fit."""
    for text in texts:
        room = max_bytes - used[0]
        if room <= 0:
            return
        raw = text.encode("utf-8")
        if len(raw) > room:
            raw = raw[:room]
            text = raw.decode("utf-8", errors="ignore")
        used[0] += len(raw)
        yield text


def _ensure_eos(tok: PreTrainedTokenizerFast, path: Path) -> None:
    if tok.eos_token is not None and tok.eos_token_id is not None:
        return
    specials = {t.content for t in tok.backend_tokenizer.get_added_tokens_decoder().values()
                if t.special}
    found = next((name for name in EOS_CANDIDATES if name in specials), None)
    if found is None:
        if path.is_dir():
            fix = f'set "eos_token" in {path / "tokenizer_config.json"} to one of its tokens'
        else:
            fix = (f"add the special token {EOS_TOKEN} to it, or use a tokenizer directory whose "
                   'tokenizer_config.json sets "eos_token"')
        raise DataError(f"tokenizer {path} has no EOS token; {fix}")
    tok.eos_token = found


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
