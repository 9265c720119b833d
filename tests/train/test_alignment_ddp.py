"""Gradient cosines under DDP are those of the global batch: two gloo ranks, each with a share of
the rows (one with no reference row at all), measure what one process measures on all of them."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cptrain import train as _train  # noqa: F401  (before diagnostics: import cycle)
from cptrain.distributed import DistEnv
from cptrain.models.build import build_model
from cptrain.train.alignment import all_reduce_sum, global_mean_gradient, gradient_alignments
from cptrain.train.diagnostics import GradientDiagnostics
from cptrain.train.hooks import Batch

VOCAB, T, WORLD = 64, 12, 2


def rows(seed: int, n: int, high: int = VOCAB) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, (n, T + 1), dtype=np.int64)


FRESH = rows(1, 4)  # the global fresh rows; rank r holds FRESH[r::2]
REF = rows(2, 3, high=VOCAB // 4)  # the global reference rows: all on rank 0
# Replayed rows with their origin task, at task 1: rank 0 one earlier + one current, rank 1
# only current ones (alone, it would have fallen back to the probe).
REPLAY = {0: (rows(3, 2, high=VOCAB // 4), np.array([0, 1])), 1: (rows(4, 2), np.array([1, 1]))}


class Stream:
    def __init__(self, seed: int) -> None:
        self.data = rows(seed, 16, high=VOCAB // 2)
        self.n = len(self.data)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        return self.data[idx]


class Buffer:
    def __init__(self, origins: np.ndarray) -> None:
        self.origins = origins

    def last_drawn(self, step: int) -> SimpleNamespace:
        return SimpleNamespace(tasks=self.origins.copy())


def fake_trainer(env: DistEnv, model: torch.nn.Module, buffer: Buffer | None):
    return SimpleNamespace(
        env=env, model=model, autocast=None, buffer=buffer, state=SimpleNamespace(step=5),
        streams=[Stream(10), Stream(11)],
    )  # fmt: skip


def measure_hook(env: DistEnv, model, fresh: np.ndarray, replay, origins) -> dict:
    hook = GradientDiagnostics(every=1, seed=0, probe_rows=3)
    trainer = fake_trainer(env, model, None if replay is None else Buffer(origins))
    out = hook.before_step(trainer, Batch(1, fresh, replay))
    return {**out, "summary": hook.summary()}


def _rank(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = build_model("tiny", VOCAB, seed=0, max_positions=64)
        env = DistEnv("ddp", rank=rank, world_size=WORLD)
        mine = torch.from_numpy(FRESH[rank::WORLD])
        ref = torch.from_numpy(REF if rank == 0 else REF[:0])  # rank 1: no reference row
        got = {
            "direct": gradient_alignments(model, mine, [ref], reduce=all_reduce_sum)[0],
            "replay": measure_hook(env, model, FRESH[rank::WORLD], *REPLAY[rank]),
            "probe": measure_hook(env, model, FRESH[rank::WORLD], None, None),
        }
        Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(got))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    d = tmp_path_factory.mktemp("ddp_cos")
    # fork: the ranks inherit the imports (a spawned one spends seconds re-importing); each sets
    # one thread first, as DataLoader workers do, so no OpenMP pool crosses the fork
    mp.start_processes(
        _rank, args=(str(d / "store"), str(d)), nprocs=WORLD, join=True, start_method="fork"
    )
    return [pickle.loads((d / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model("tiny", VOCAB, seed=0, max_positions=64)


def close(a: dict, b: dict, keys: tuple[str, ...]) -> None:
    for k in keys:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k


FIGURES = ("grad_cos", "grad_norm_fresh", "grad_norm_replay", "loss_fresh", "loss_replay")


def test_two_ranks_measure_the_global_batch(ranks, model):
    one = gradient_alignments(model, torch.from_numpy(FRESH), [torch.from_numpy(REF)])[0]
    assert one["rows_fresh"] == 4 and one["rows_replay"] == 3
    for got in ranks:  # every rank holds the global figures
        close(got["direct"], one, FIGURES)
        assert (got["direct"]["rows_fresh"], got["direct"]["rows_replay"]) == (4, 3)
    # rank 0's share alone (what was logged before) is another number
    half = gradient_alignments(model, torch.from_numpy(FRESH[0::2]), [torch.from_numpy(REF)])[0]
    assert abs(half["grad_cos"] - one["grad_cos"]) > 1e-3


def test_ranks_agree_on_the_reference_and_measure_it_whole(ranks, model):
    earlier = np.concatenate([REPLAY[0][0][:1]])
    current = np.concatenate([REPLAY[0][0][1:], REPLAY[1][0]])
    one = gradient_alignments(
        model, torch.from_numpy(FRESH), [torch.from_numpy(earlier), torch.from_numpy(current)]
    )
    for got in ranks:
        rec = got["replay"]
        assert rec["grad_ref"] == "replay"  # rank 1 has no earlier row, yet no probe
        assert (rec["grad_cos_ref_rows"], rec["grad_cos_fresh_rows"]) == (1, 4)
        assert rec["grad_cos_current_ref_rows"] == 3
        assert rec["replay_current_share"] == pytest.approx(3 / 4)
        close(rec, one[0], FIGURES)
        assert rec["grad_cos_current"] == pytest.approx(one[1]["grad_cos"], rel=1e-5, abs=1e-7)
        assert rec["summary"]["grad_cos_ref_rows_mean"] == 1
        # the row losses are the global batch's: each group's mean over every rank's rows
        assert rec["loss_replay_earlier"] == pytest.approx(one[0]["loss_replay"], rel=1e-5)
        assert rec["loss_replay_current"] == pytest.approx(one[1]["loss_replay"], rel=1e-5)
        assert rec["loss_fresh"] == pytest.approx(one[0]["loss_fresh"], rel=1e-5)


def test_the_probe_is_split_between_ranks_not_repeated(ranks, model):
    alone = measure_hook(DistEnv("none"), model, FRESH, None, None)
    assert alone["grad_ref"] == "probe" and alone["grad_cos_ref_rows"] == 3
    for got in ranks:
        rec = got["probe"]
        assert rec["grad_cos_ref_rows"] == 3 and rec["grad_cos_fresh_rows"] == 4
        close(rec, alone, FIGURES)


def test_global_mean_gradient_weighs_ranks_by_their_rows():
    # rank 0: mean over 3 rows = 2.0, rank 1: mean over 1 row = 6.0 -> global mean 3.0
    other = torch.tensor([6.0 * 1 / 4])

    def reduce(ts):  # what the all-reduce adds: the other rank's weighted share
        ts[0] += other

    got = global_mean_gradient([torch.tensor([2.0])], 3, 4, reduce)
    assert got[0].item() == pytest.approx(3.0)
