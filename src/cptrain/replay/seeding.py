"""Rows for replay.seed: stand-ins for pre-training data one does not have.

Two sources, both deterministic in the run seed (and the source's origin, its index in
replay.seed), and both split over data-parallel ranks the same way (each rank gets a contiguous
share, so every rank's buffer holds its part, as with fresh rows):

- proxy_rows: training windows of a prepared task, a uniform sample without replacement
  (repeating the task in fresh permutations when it has fewer windows than asked for).
- generate_rows: sequences sampled from the starting model, batch_size at a time, with a KV
  cache, from a prompt of BOS and/or a short document prefix (document_prefixes). Each completed
  batch is written to work_dir as an atomic file; a rerun after a kill loads those and
  generates only the rest. Batch b depends only on (seed, origin, b, the model, the settings),
  never on what ran before it, so the result equals an uninterrupted generation (on the same
  device type and torch build: floating point sums differ between kernels).

Token counts are those of data.tokens_per_task: seq_len (= row_len − 1) per row.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import math
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cptrain import fsutil
from cptrain.errors import ConfigError, DataError
from cptrain.replay.mixer import split_for_rank
from cptrain.replay.storage import token_dtype

if TYPE_CHECKING:
    import torch

TAG_PROXY = 0x5EED_7A5C
TAG_PROMPTS = 0x5EED_9807
TAG_GENERATE = 0x5EED_6E4E
SPEC_FILE = "spec.json"
SPEC_FORMAT = "cptrain-seed-generation"
_BATCH_GLOB = "batch_*.npz"
_SCAN_TOKENS = 1 << 24  # document scan block
_READ_ROWS = 4096  # proxy windows read per call
_MASK63 = (1 << 63) - 1


class TokenSource(Protocol):
    """What document_prefixes reads (a cptrain.data.shards.ShardSet)."""

    num_tokens: int
    eos_id: int

    def read(self, start: int, n: int) -> np.ndarray: ...


def rows_for_tokens(tokens: int, row_len: int) -> int:
    """Rows of row_len tokens that hold `tokens` tokens counted as training tokens (row_len − 1
    per row, as data.tokens_per_task counts them)."""
    if tokens < 1 or row_len < 2:
        raise ValueError(f"tokens ({tokens}) must be ≥ 1 and row_len ({row_len}) ≥ 2")
    return math.ceil(tokens / (row_len - 1))


def _rng(seed: int, origin: int, tag: int) -> np.random.Generator:
    entropy = [seed & ((1 << 64) - 1), origin, tag]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def _sample_indices(rng: np.random.Generator, population: int, n: int) -> np.ndarray:
    """n indices of [0, population): distinct while n ≤ population, else whole permutations
    followed by a distinct remainder."""
    full, rest = divmod(n, population)
    parts = [rng.permutation(population) for _ in range(full)]
    if rest:
        parts.append(rng.choice(population, size=rest, replace=False))
    return np.concatenate(parts).astype(np.int64)


def _rank_share(n: int, rank: int, world_size: int) -> slice:
    start, count = split_for_rank(n, world_size, rank)
    return slice(start, start + count)


def proxy_rows(
    rows: Callable[[np.ndarray], np.ndarray],
    n_windows: int,
    *,
    tokens: int,
    row_len: int,
    seed: int,
    origin: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> np.ndarray:
    """Seed rows of `source: task`: this rank's share of rows_for_tokens(tokens, row_len)
    training windows of the proxy task, int64 [n, row_len].

    rows(idx) returns the task's windows idx (TaskStream.rows); n_windows is how many there
    are. The windows are a uniform sample without replacement, repeated in fresh permutations
    when the task has fewer windows than asked for."""
    if n_windows < 1:
        raise DataError("the replay.seed proxy task has no training window; add data to it")
    n = rows_for_tokens(tokens, row_len)
    idx = _sample_indices(_rng(seed, origin, TAG_PROXY), n_windows, n)
    idx = idx[_rank_share(n, rank, world_size)]
    out = np.empty((len(idx), row_len), dtype=np.int64)
    order = np.argsort(idx, kind="stable")  # read in file order
    for a in range(0, len(order), _READ_ROWS):
        sel = order[a : a + _READ_ROWS]
        got = np.asarray(rows(idx[sel]))
        if got.shape != (len(sel), row_len):
            raise DataError(
                f"the replay.seed proxy task returned windows of shape {got.shape}, expected "
                f"{(len(sel), row_len)}"
            )
        out[sel] = got
    return out


def _document_starts(source: TokenSource, min_len: int) -> np.ndarray:
    """Start offsets of the documents (each ends with EOS) with at least min_len tokens."""
    n = int(source.num_tokens)
    ends = []
    for a in range(0, n, _SCAN_TOKENS):
        block = source.read(a, min(_SCAN_TOKENS, n - a))
        ends.append(np.flatnonzero(block == source.eos_id) + a)
    eos = np.concatenate(ends) if ends else np.empty(0, dtype=np.int64)
    starts = np.concatenate([[0], eos + 1])
    stops = np.append(eos, n)  # a last document without EOS ends with the stream
    keep = (stops - starts >= min_len) & (starts < n)
    return starts[keep].astype(np.int64)


def document_prefixes(
    source: TokenSource, *, n: int, prefix_tokens: int, seed: int, origin: int = 0
) -> np.ndarray:
    """n prompts for `prompt: {task, prefix_tokens}`: the first prefix_tokens tokens of
    documents of the task (source: its train ShardSet), int64 [n, prefix_tokens]. Documents
    are drawn uniformly among those that long, without replacement while there are enough."""
    if n < 1 or prefix_tokens < 1:
        raise ValueError(f"n ({n}) and prefix_tokens ({prefix_tokens}) must be ≥ 1")
    starts = _document_starts(source, prefix_tokens)
    if len(starts) == 0:
        raise DataError(
            f"no document of the replay.seed prompt task has {prefix_tokens} tokens; lower "
            "prompt.prefix_tokens or prompt from another task"
        )
    picks = starts[_sample_indices(_rng(seed, origin, TAG_PROMPTS), len(starts), n)]
    return np.stack([source.read(int(p), prefix_tokens) for p in picks]).astype(np.int64)


# ---- generation ----------------------------------------------------------------------------
def _model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap fingerprint of a model: its config and, per parameter, its name, shape, dtype
    and up to 1024 evenly spaced values (enough to tell two checkpoints apart)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {k: v for k, v in config.to_dict().items() if k != "transformers_version"}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step][:1024].float().cpu().numpy()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()


def _batch_path(work_dir: Path, b: int) -> Path:
    return work_dir / f"batch_{b:06d}.npz"


def _save_batch(path: Path, tokens: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, tokens=tokens, crc=np.uint32(zlib.crc32(tokens)))
    fsutil.atomic_write_bytes(path, buf.getvalue())


def _load_batch(path: Path, shape: tuple[int, int], dtype: np.dtype) -> np.ndarray | None:
    """A committed batch, or None when it is missing or not what this generation makes."""
    try:
        with np.load(path) as z:
            tokens, crc = z["tokens"], int(z["crc"])
    except (OSError, ValueError, KeyError, zlib.error, EOFError, zipfile.BadZipFile):
        return None
    if tokens.shape != shape or tokens.dtype != dtype:
        return None
    tokens = np.ascontiguousarray(tokens)
    return tokens if zlib.crc32(tokens) == crc else None


def _prepare_work_dir(work_dir: Path, spec: dict[str, Any]) -> None:
    """Keep committed batches of this very generation; delete those of any other."""
    work_dir.mkdir(parents=True, exist_ok=True)
    spec_path = work_dir / SPEC_FILE
    try:
        old = json.loads(spec_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if old == spec:
        return
    for p in work_dir.glob(_BATCH_GLOB):
        p.unlink(missing_ok=True)
    fsutil.atomic_write_json(spec_path, spec)


NUCLEUS_K = 1024


def _forward_kwargs(model: torch.nn.Module) -> tuple[str, bool]:
    """(name of the cache argument, whether logits_to_keep is accepted): transformers 5 calls
    the cache `cache`, 4.x `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def _sample_next(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    vocab_size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """One token per row from the last position's logits [B, V]: temperature, nucleus (top-p)
    truncation, and no id ≥ vocab_size (those logits are masked, so a model whose embedding is
    larger than the shards' vocabulary never produces a row the buffer would refuse).

    The nucleus is found with top-k (k = 1024, grown ×4 until it holds top_p of the mass)
    rather than a sort of the whole vocabulary, and sampled among its members in token-id
    order: a full sort and a multinomial over 49k ids were half the time of a step at batch
    16 (benches/released.py)."""
    import torch

    logits = logits.float()
    if logits.shape[-1] > vocab_size:
        logits[:, vocab_size:] = float("-inf")
    probs = (logits / temperature).softmax(-1)
    if top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    v = probs.shape[-1]
    k = min(v, NUCLEUS_K)
    while True:
        top, idx = probs.topk(k, dim=-1)  # descending
        if k == v or bool((top.sum(-1) >= top_p).all()):
            break
        k = min(v, 4 * k)
    outside = top.cumsum(-1) - top > top_p  # the most likely token always stays
    top = top.masked_fill(outside, 0.0)
    by_id = idx.argsort(dim=-1)  # candidates in id order: the draw does not depend on ties
    idx, top = idx.gather(-1, by_id), top.gather(-1, by_id)
    pick = torch.multinomial(top, 1, generator=generator)
    return idx.gather(-1, pick).squeeze(-1)


def _generate_batch(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    row_len: int,
    *,
    temperature: float,
    top_p: float,
    vocab_size: int,
    generator: torch.Generator,
    autocast: torch.dtype | None,
    on_token: Callable[[int], None],
) -> torch.Tensor:
    """[B, row_len] rows: the prompt [B, P] continued by sampling, one forward per token with
    the KV cache of the ones before (the prompt in one forward)."""
    import torch

    b, p = prompt.shape
    out = torch.empty((b, row_len), dtype=torch.long, device=prompt.device)
    out[:, :p] = prompt
    cache_arg, keep_arg = _forward_kwargs(model)
    extra: dict[str, Any] = {"logits_to_keep": 1} if keep_arg else {}
    cast = (
        torch.autocast(device_type=prompt.device.type, dtype=autocast)
        if autocast is not None
        else contextlib.nullcontext()
    )
    cache = None
    x = prompt
    for pos in range(p, row_len):
        with cast:
            res = model(input_ids=x, use_cache=True, **{cache_arg: cache}, **extra)
        cache = getattr(res, "cache", None)
        if cache is None:
            cache = res.past_key_values
        nxt = _sample_next(
            res.logits[:, -1, :],
            temperature=temperature,
            top_p=top_p,
            vocab_size=vocab_size,
            generator=generator,
        )
        out[:, pos] = nxt
        x = nxt[:, None]
        on_token(b)
    return out


def _batch_generator(device: torch.device, seed: int, origin: int, b: int) -> torch.Generator:
    import torch

    state = np.random.SeedSequence([seed & ((1 << 64) - 1), origin, b, TAG_GENERATE])
    g = torch.Generator(device=device)
    g.manual_seed(int(state.generate_state(1, np.uint64)[0]) & _MASK63)
    return g


def _prompt_rows(
    prompts: np.ndarray | None, bos_id: int | None, rows: range, vocab_size: int
) -> np.ndarray:
    """[len(rows), P] prompts of global rows `rows`: BOS (if any) then prompts[i % k]."""
    parts = []
    if bos_id is not None:
        parts.append(np.full((len(rows), 1), bos_id, dtype=np.int64))
    if prompts is not None:
        parts.append(prompts[np.arange(rows.start, rows.stop) % len(prompts)])
    out = np.concatenate(parts, axis=1)
    if out.size and (out.min() < 0 or out.max() >= vocab_size):
        raise DataError(
            f"a replay.seed prompt token is outside the vocabulary [0, {vocab_size}); the "
            "prompt task's shards do not match this run's tokenizer"
        )
    return out


def generate_rows(
    model: torch.nn.Module,
    *,
    tokens: int,
    row_len: int,
    batch_size: int,
    temperature: float,
    top_p: float,
    seed: int,
    prompts: np.ndarray | None,
    bos_id: int | None,
    work_dir: Path,
    progress: bool,
    vocab_size: int,
    origin: int = 0,
    rank: int = 0,
    world_size: int = 1,
    autocast: torch.dtype | None = None,
    decode: Callable[[list[int]], str] | None = None,
    sample_path: Path | None = None,
) -> np.ndarray:
    """Seed rows of `source: self`: this rank's share of rows_for_tokens(tokens, row_len)
    sequences sampled from `model`, int64 [n, row_len], each exactly row_len tokens: its prompt
    (bos_id, if not None, then prompts[i % len(prompts)], if given) and the continuation.

    Sequences are made batch_size at a time (batch b = global rows b·batch_size, …); the
    batches are shared out over ranks in contiguous runs, so the rows of all ranks together do
    not depend on the world size. Sampled ids are < vocab_size (the shards' vocabulary): larger
    ids of the model's logits are masked. Each finished batch is committed to work_dir (one
    directory per rank and origin); a rerun with the same arguments and model continues from
    them; anything else in it is deleted first. Delete work_dir once a checkpoint holds the
    buffer. progress: a bar with tokens/s. decode and sample_path: write_sample() of the
    rows. The model runs in eval mode and is handed back in the mode it came in; pass the bare
    model (not a DDP/FSDP wrapper)."""
    import torch

    if prompts is None and bos_id is None:
        raise ValueError("generate_rows needs prompts, bos_id or both")
    seed, bos_id = int(seed), None if bos_id is None else int(bos_id)
    if prompts is not None:
        prompts = np.asarray(prompts, dtype=np.int64)
        if prompts.ndim != 2 or len(prompts) == 0:
            raise ValueError(f"prompts must be [k ≥ 1, prefix_tokens], not {prompts.shape}")
    p = (bos_id is not None) + (0 if prompts is None else prompts.shape[1])
    if p >= row_len:
        raise ConfigError(
            f"replay.seed prompts of {p} tokens leave nothing to generate in rows of {row_len} "
            "tokens (seq_len + 1); lower prompt.prefix_tokens below train.seq_len"
        )
    n_rows = rows_for_tokens(tokens, row_len)
    n_batches = math.ceil(n_rows / batch_size)
    mine = range(n_batches)[_rank_share(n_batches, rank, world_size)]
    device = next(model.parameters()).device
    dtype = token_dtype(vocab_size)
    spec = {
        "format": SPEC_FORMAT,
        "version": 1,
        "seed": seed,
        "origin": origin,
        "rows": n_rows,
        "row_len": row_len,
        "batch_size": batch_size,
        "temperature": temperature,
        "top_p": top_p,
        "bos_id": bos_id,
        "vocab_size": vocab_size,
        "prompts": None if prompts is None else hashlib.sha256(prompts.tobytes()).hexdigest(),
        "prompt_shape": None if prompts is None else list(prompts.shape),
        "model": _model_fingerprint(model),
        "device": device.type,
        "autocast": str(autocast),
        "torch": torch.__version__,
    }
    work_dir = Path(work_dir)
    _prepare_work_dir(work_dir, spec)

    def batch_rows(b: int) -> range:
        return range(b * batch_size, min((b + 1) * batch_size, n_rows))

    done: dict[int, np.ndarray] = {}
    for b in mine:
        got = _load_batch(_batch_path(work_dir, b), (len(batch_rows(b)), row_len), dtype)
        if got is not None:
            done[b] = got
    new_per_row = row_len - p
    total = sum(len(batch_rows(b)) for b in mine) * new_per_row
    initial = sum(len(v) for v in done.values()) * new_per_row
    from cptrain.progress import progress_bar

    bar = progress_bar(
        total=total,
        initial=initial,
        unit="tok",
        unit_scale=True,
        desc=f"replay seed {origin}: sampling",
        disable=not progress,
        dynamic_ncols=True,
    )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b in mine:
                if b in done:
                    continue
                prompt = _prompt_rows(prompts, bos_id, batch_rows(b), vocab_size)
                rows = _generate_batch(
                    model,
                    torch.from_numpy(prompt).to(device),
                    row_len,
                    temperature=temperature,
                    top_p=top_p,
                    vocab_size=vocab_size,
                    generator=_batch_generator(device, seed, origin, b),
                    autocast=autocast,
                    on_token=bar.update,
                )
                done[b] = np.ascontiguousarray(rows.cpu().numpy().astype(dtype))
                _save_batch(_batch_path(work_dir, b), done[b])
    finally:
        model.train(was_training)
        bar.close()
    parts = [done[b] for b in mine]
    out = np.concatenate(parts).astype(np.int64) if parts else np.empty((0, row_len), np.int64)
    if decode is not None and sample_path is not None:
        write_sample(out, decode, sample_path, title=f"replay seed {origin}: sampled text")
    return out


def write_sample(
    rows: np.ndarray,
    decode: Callable[[list[int]], str],
    path: Path,
    *,
    title: str,
    n: int = 8,
) -> None:
    """A text file for a person to read: the first n of the rows, decoded (atomic)."""
    rows = np.asarray(rows)
    lines = [f"# {title}", f"# {len(rows)} rows of {rows.shape[1] if rows.ndim == 2 else 0} "
             f"tokens; the first {min(n, len(rows))} follow", ""]
    for i, row in enumerate(rows[:n]):
        lines += [f"--- row {i} ---", decode([int(t) for t in row]), ""]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fsutil.atomic_write_text(Path(path), "\n".join(lines))

