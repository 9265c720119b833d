"""Byte-level BPE tokenizers: train offline, save and load as Hugging Face fast tokenizers.

A trained tokenizer has one special token, ``<|endoftext|>``, used as EOS between documents and
as BOS/PAD where Hugging Face code asks for one. ``tokenizer_sha256`` fingerprints a tokenizer so
token shards can be tied to the tokenizer that produced them.

A Hugging Face *model* directory (``config.json`` beside the tokenizer files) brings its own
document separators: ``document_separators`` picks the model's EOS (and BOS, where the model's
tokenizer adds one), and ``model_tokenizer_sha256`` fingerprints the tokenizer of such a
directory exactly as ``cptrain prepare`` records it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cptrain import fsutil
from cptrain.errors import ConfigError, DataError, EnvironmentProblem

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
MIN_VOCAB_SIZE = 257  # 256 byte symbols + EOS
DEFAULT_MAX_BYTES = 50_000_000
# Tried in order when a tokenizer does not name its EOS (e.g. a bare tokenizer.json).
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
# Runtime state, not vocabulary: Hugging Face code toggles these on the backend.
_VOLATILE_KEYS = ("truncation", "padding")
MODEL_CONFIG = "config.json"
# The files of a model directory that decide its tokenizer and separators (not its weights).
MODEL_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "added_tokens.json", MODEL_CONFIG, "generation_config.json")
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Separators:
    """The token ids that frame each document in the shards: ``[bos] tokens eos``.

    ``source`` is "tokenizer" (the tokenizer's EOS, no BOS: cptrain's own tokenizers and bare
    tokenizer files/directories) or "model" (a Hugging Face model directory's own EOS/BOS).
    """

    eos_id: int
    eos_token: str
    bos_id: int | None = None
    bos_token: str | None = None
    source: str = "tokenizer"


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
        # Away from a terminal the Rust bar draws nothing but blank lines.
        show_progress=progress and sys.stderr.isatty(),
    )
    used = [0]
    with _stdout_to_stderr():  # the Rust trainer's progress bar writes newlines to stdout
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
        kind = "model" if is_model_dir(path) else "tokenizer"
        raise DataError(
            f"{kind} directory {path} has no tokenizer.json; save a fast tokenizer there "
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


def is_model_dir(path: Path | str | None) -> bool:
    """A Hugging Face model directory: a directory with ``config.json``."""
    return path is not None and Path(path).is_dir() and (Path(path) / MODEL_CONFIG).is_file()


def model_tokenizer_sha256(model_dir: Path | str) -> str | None:
    """sha256 of a model directory's tokenizer as ``cptrain prepare`` records it (prepare.json
    ``tokenizer.sha256`` and every shard manifest's ``tokenizer_sha256``) when that directory
    is the prepare config's ``tokenizer.path``; None when the directory has no tokenizer.json.

    DataError when the directory does not exist or its tokenizer cannot be loaded."""
    model_dir = require_model_dir(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        return None
    return tokenizer_sha256(load_tokenizer(model_dir))


def require_model_dir(model_dir: Path | str) -> Path:
    """``model_dir`` as a Path; DataError when no such directory exists (checked before the
    data's tokenizer is loaded, so a mistyped ``init_from`` fails at once)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DataError(f"model directory {model_dir} does not exist; fix the path")
    return model_dir


def require_gguf() -> None:
    """EnvironmentProblem unless the ``gguf`` package (transformers' GGUF reader) imports."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise EnvironmentProblem(
            "reading a .gguf file needs the gguf package, which is not installed; run "
            "`pip install gguf` (or bash scripts/setup.sh)"
        ) from None


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 points at stderr for the block (what native code prints included), so
    stdout carries only cptrain's own lines."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def gguf_tokens(path: Path | str) -> list[str] | None:
    """The vocabulary a ``.gguf`` file carries (``tokenizer.ggml.tokens``, by id), or None
    when it carries none. Needs the ``gguf`` package (numpy only: no torch)."""
    require_gguf()
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).fields.get("tokenizer.ggml.tokens")
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable GGUF file ({exc})") from None
    if field is None:
        return None
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def model_separators(model_dir: Path | str) -> Separators | None:
    """The separators prepare uses with this model directory as ``tokenizer.path`` (None when
    it has no tokenizer.json); compare with prepare.json ``tokenizer.eos_id``/``bos_id``."""
    model_dir = require_model_dir(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        return None
    return document_separators(load_tokenizer(model_dir), model_dir)


def document_separators(tok: PreTrainedTokenizerFast, path: Path | str | None) -> Separators:
    """The separators prepare frames documents with when ``tok`` was loaded from ``path``.

    For anything but a model directory: the tokenizer's EOS after each document, no BOS (what
    cptrain always did). For a model directory: the model's EOS, i.e. the tokenizer's EOS when
    config.json (or generation_config.json) does not name another one, else the first id it
    names; and the tokenizer's BOS before each document when the model uses one:
    tokenizer_config.json says ``add_bos_token: true`` (``false`` says it does not), or, when
    it says neither, the tokenizer's post-processor prepends it."""
    if path is None or not is_model_dir(path):
        return Separators(int(tok.eos_token_id), str(tok.eos_token))
    model_dir = Path(path)
    eos_id = _model_eos_id(tok, model_dir)
    bos_id = _model_bos_id(tok, model_dir)
    return Separators(
        eos_id=eos_id,
        eos_token=str(tok.convert_ids_to_tokens(eos_id)),
        bos_id=bos_id,
        bos_token=None if bos_id is None else str(tok.convert_ids_to_tokens(bos_id)),
        source="model",
    )


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError):
        raise DataError(f"{file} is not valid JSON; repair or re-save the model directory"
                        ) from None
    return data if isinstance(data, dict) else {}


def _declared_ids(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def _model_eos_id(tok: PreTrainedTokenizerFast, model_dir: Path) -> int:
    tok_eos = int(tok.eos_token_id)
    declared = (_declared_ids(_read_json(model_dir / MODEL_CONFIG).get("eos_token_id"))
                or _declared_ids(_read_json(model_dir / "generation_config.json")
                                 .get("eos_token_id")))
    if not declared or tok_eos in declared:
        return tok_eos
    eos_id = declared[0]
    if eos_id >= len(tok):
        raise DataError(
            f"{model_dir / MODEL_CONFIG} names eos_token_id {eos_id}, outside its tokenizer's "
            f"{len(tok)} tokens; fix eos_token_id there or the tokenizer's eos_token"
        )
    logger.warning("%s: the model's eos_token_id %d (%s) is not the tokenizer's EOS %d (%s); "
                   "documents end with the model's", model_dir, eos_id,
                   tok.convert_ids_to_tokens(eos_id), tok_eos, tok.eos_token)
    return eos_id


def _model_bos_id(tok: PreTrainedTokenizerFast, model_dir: Path) -> int | None:
    bos_id = tok.bos_token_id
    if tok.bos_token is None or bos_id is None:
        return None
    flag = _read_json(model_dir / "tokenizer_config.json").get("add_bos_token")
    if isinstance(flag, bool):
        return int(bos_id) if flag else None
    backend = tok.backend_tokenizer
    saved, backend.encode_special_tokens = backend.encode_special_tokens, True
    try:
        plain = backend.encode("a", add_special_tokens=False).ids
        framed = backend.encode("a", add_special_tokens=True).ids
    finally:
        backend.encode_special_tokens = saved
    # What the post-processor puts before the text (the text itself may contain bos_id).
    n = len(plain)
    starts = [k for k in range(len(framed) - n + 1) if n and framed[k : k + n] == plain]
    prefix = framed[: starts[0]] if starts else framed[:1]
    return int(bos_id) if bos_id in prefix else None


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
    if is_model_dir(path):  # the model's config names its EOS even when the tokenizer does not
        declared = _declared_ids(_read_json(path / MODEL_CONFIG).get("eos_token_id"))
        if declared and declared[0] < len(tok):
            found = str(tok.convert_ids_to_tokens(declared[0]))
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
