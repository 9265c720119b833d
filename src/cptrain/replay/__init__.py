"""Experience replay: a disk-backed, crash-safe buffer, admission policies, prefetch, mixing."""

from cptrain.replay.buffer import ReplayBuffer
from cptrain.replay.config import ReplayConfig
from cptrain.replay.mixer import effective_alpha, mix_counts, split_for_rank

__all__ = ["ReplayBuffer", "ReplayConfig", "effective_alpha", "mix_counts", "split_for_rank"]
