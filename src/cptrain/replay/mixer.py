"""Pure batch arithmetic: how many rows of a step are fresh or replayed, and who draws them."""

from __future__ import annotations

import math
from fractions import Fraction

from cptrain.errors import ConfigError

MODES = ("substitute", "additive")


def exact_alpha(alpha: float) -> Fraction:
    # The decimal the user wrote (0.3), not its binary neighbour (0.2999…), so that halves
    # such as 0.3·5 = 1.5 round up as promised.
    return Fraction(repr(float(alpha)))


def _round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def replay_share(alpha: float, mode: str) -> Fraction:
    """Replayed rows per batch row asked for: α (substitute) or α/(1−α) (additive)."""
    a = exact_alpha(alpha)
    return a if mode == "substitute" else a / (1 - a)


def mix_counts(alpha: float, batch_size: int, mode: str) -> tuple[int, int]:
    """(n_fresh, n_replay) for one global batch; replay counts are rounded half up.

    substitute: n_replay = round(α·B), n_fresh = B − n_replay (tokens per step fixed).
    additive: n_fresh = B, n_replay = round(α·B/(1−α)) (fresh tokens per step fixed).
    """
    if not 0.0 <= alpha < 1.0:
        raise ConfigError(f"replay.alpha must be in [0, 1) (got {alpha}); e.g. 0.25")
    if mode not in MODES:
        raise ConfigError(f"replay.mode must be 'substitute' or 'additive' (got {mode!r})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ConfigError(f"batch size must be a non-negative integer (got {batch_size!r})")
    n_replay = _round_half_up(replay_share(alpha, mode) * batch_size)
    if mode == "substitute":
        return batch_size - n_replay, n_replay
    return batch_size, n_replay


def split_for_rank(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """(start, count) of rank's share of n rows: contiguous, in rank order, counts differ by ≤ 1.

    The first n % world_size ranks take one extra row.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if n < 0:
        raise ValueError(f"cannot split a negative number of rows ({n})")
    base, extra = divmod(n, world_size)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


def effective_alpha(n_fresh: int, n_replay: int) -> float:
    """Replayed fraction of a step's rows (what was achieved, e.g. while the buffer fills)."""
    total = n_fresh + n_replay
    return n_replay / total if total else 0.0
