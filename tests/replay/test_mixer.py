"""Batch mixing arithmetic: exact counts for both accountings, and the per-rank split."""

from decimal import ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cptrain.errors import ConfigError
from cptrain.replay.mixer import effective_alpha, mix_counts, split_for_rank

ALPHAS = [0.0, 0.01, 0.05, 0.1, 0.125, 0.2, 0.25, 0.3, 1 / 3, 0.375, 0.4, 0.5, 0.6, 0.7, 0.75,
          0.8, 0.9, 0.95, 0.99]


def _half_up(x: Decimal) -> int:
    return int(x.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _oracle(alpha: float, b: int, mode: str) -> tuple[int, int]:
    # Independent of the implementation: decimal arithmetic on the value as written.
    a = Decimal(repr(alpha))
    if mode == "substitute":
        r = _half_up(a * b)
        return b - r, r
    return b, _half_up(a * b / (1 - a))


@pytest.mark.parametrize("mode", ["substitute", "additive"])
def test_counts_match_decimal_oracle_over_many_pairs(mode):
    for alpha in ALPHAS:
        for b in range(0, 300):
            assert mix_counts(alpha, b, mode) == _oracle(alpha, b, mode), (alpha, b)


def test_substitute_keeps_tokens_per_step_and_additive_keeps_fresh_rows():
    for alpha in ALPHAS:
        for b in range(1, 200):
            fresh, replay = mix_counts(alpha, b, "substitute")
            assert fresh + replay == b
            assert abs(replay - alpha * b) <= 0.5 + 1e-9
            fresh, replay = mix_counts(alpha, b, "additive")
            assert fresh == b
            assert abs(replay - alpha * b / (1 - alpha)) <= 0.5 + 1e-9


def test_exact_halves_round_up():
    # α·B = k + 1/2 exactly: 0.5·B for odd B, 0.3·5, 0.25·(4j+2)
    for b in range(1, 101, 2):
        assert mix_counts(0.5, b, "substitute")[1] == (b + 1) // 2
    assert mix_counts(0.3, 5, "substitute")[1] == 2  # 1.5 → 2, although 0.3 is 0.2999… in binary
    for j in range(20):
        assert mix_counts(0.25, 4 * j + 2, "substitute")[1] == j + 1
    # additive with α=0.2 replays B/4: B = 4j + 2 gives j + 1/2
    for j in range(20):
        assert mix_counts(0.2, 4 * j + 2, "additive")[1] == j + 1


@given(st.floats(min_value=0.0, max_value=0.999, allow_nan=False), st.integers(0, 10_000))
def test_counts_property(alpha, b):
    fresh, replay = mix_counts(alpha, b, "substitute")
    assert (fresh, replay) == _oracle(alpha, b, "substitute")
    assert mix_counts(alpha, b, "additive") == _oracle(alpha, b, "additive")


@pytest.mark.parametrize(
    "alpha, b, mode", [(1.0, 8, "substitute"), (-0.1, 8, "additive"), (0.5, 8, "mixed"),
                       (0.5, -1, "substitute"), (float("nan"), 8, "substitute")],
)
def test_bad_inputs_are_config_errors(alpha, b, mode):
    with pytest.raises(ConfigError) as err:
        mix_counts(alpha, b, mode)
    assert "\n" not in str(err.value)


def test_rank_split_covers_rows_in_order_and_balances():
    for n in range(0, 70):
        for world in range(1, 9):
            parts = [split_for_rank(n, world, r) for r in range(world)]
            assert parts == [split_for_rank(n, world, r) for r in range(world)]  # deterministic
            starts = [s for s, _ in parts]
            counts = [c for _, c in parts]
            assert sum(counts) == n
            assert max(counts) - min(counts) <= 1
            # contiguous and in rank order: each share starts where the previous ended
            assert starts[0] == 0
            assert all(starts[i] + counts[i] == starts[i + 1] for i in range(world - 1))
            covered = [i for s, c in parts for i in range(s, s + c)]
            assert covered == list(range(n))


def test_rank_split_rejects_bad_rank():
    with pytest.raises(ValueError):
        split_for_rank(10, 2, 2)
    with pytest.raises(ValueError):
        split_for_rank(10, 0, 0)


def test_effective_alpha():
    assert effective_alpha(6, 2) == 2 / 8
    assert effective_alpha(0, 0) == 0.0
    fresh, replay = mix_counts(0.25, 64, "additive")
    assert effective_alpha(fresh, replay) == pytest.approx(replay / (64 + replay))
