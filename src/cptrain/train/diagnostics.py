"""Gradient-alignment diagnostics as a training hook (config section ``diagnostics:``).

Every ``diagnostics.every`` steps, before the step, measure cos(∇ fresh rows, ∇ reference rows)
on the weights the step starts from. The reference is always rows of *earlier* tasks: the
step's replayed rows whose origin task is before the current one (seed rows count as earlier:
they stand in for what the model saw before task 0). When the step replayed none (no replay,
or every replayed row is the current task's, which ``replay_from: all`` allows), it is a probe
batch of the same size from earlier tasks' training windows, so every method gets a measure of
interference between the current task and the past, never of the current task with itself.

What the earlier-task reference leaves out is logged beside it, not hidden: with replay,
``replay_current_share`` is the fraction of the replayed rows that are the current task's and
``grad_cos_current`` the cosine of the fresh rows' gradient with theirs (when there are any).
Only ``grad_cos`` enters the run's ``grad_cos_mean``.

A cosine of two mean gradients shrinks towards 0 as they are taken over fewer rows, so each
record carries its sizes: ``grad_cos_ref_rows`` (and ``grad_cos_current_ref_rows``) the
reference rows, ``grad_cos_fresh_rows`` the fresh ones, and the summary the mean reference size
(``grad_cos_ref_rows_mean``). Under DDP every figure is that of the global batch: each rank's
gradients are averaged over the ranks before any dot product (``alignment.gradient_alignments``)
and the ranks agree on the reference: the replayed earlier-task rows when any rank has one
(a rank with none adds nothing), else the probe, split between the ranks.

On the same steps, ``loss_fresh``, ``loss_replay_current`` and ``loss_replay_earlier`` are the
mean token losses of the step's fresh rows and of its replayed rows of the current and of
earlier tasks, at the weights the step starts from: from the gradients' forward passes, or,
in a step with nothing to compare (the first task), from ``row_losses``.

Nothing here changes training: gradients come from ``torch.autograd.grad``, never ``.grad``,
and the replayed rows' origins are re-derived from the buffer without drawing from it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cptrain.errors import CheckpointError
from cptrain.train.hooks import Batch, Hook

if TYPE_CHECKING:
    from cptrain.train.run_view import RunView


class GradientDiagnostics(Hook):
    def __init__(self, every: int, seed: int, probe_rows: int):
        self.every = every
        self.seed = seed
        self.probe_rows = probe_rows
        # Cosines measured after the first task, for the run's mean, and their reference sizes.
        self.cos_sum = 0.0
        self.cos_n = 0
        self.ref_rows_sum = 0
        self.ref_rows_n = 0  # a checkpoint from before reference sizes were kept counts none

    def _split_replay(
        self, run: RunView, batch: Batch
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The step's replayed rows of earlier tasks and of the current one; None without
        replayed rows, or when their origins cannot be told (then none counts as earlier)."""
        if batch.replay is None or not len(batch.replay) or run.buffer is None:
            return None
        drawn = run.buffer.last_drawn(run.state.step)
        origins = None if drawn is None else drawn.tasks
        if origins is None or len(origins) != len(batch.replay):
            return None
        return batch.replay[origins < batch.task], batch.replay[origins == batch.task]

    def _probe(self, run: RunView, batch: Batch) -> np.ndarray | None:
        """Windows of earlier tasks' training data, seeded by the step; None in task 0."""
        if batch.task == 0:
            return None
        rng = np.random.default_rng([self.seed, run.state.step, 0xD1A6])
        tasks = rng.integers(0, batch.task, self.probe_rows)
        streams = run.streams
        return np.concatenate(
            [streams[t].rows(rng.integers(0, streams[t].n, 1)) for t in tasks.tolist()]
        )

    def before_step(self, run: RunView, batch: Batch) -> dict[str, Any]:
        step = run.state.step
        env = run.env
        # autograd.grad bypasses FSDP2's reduce hooks, so sharded runs are not measured.
        if not self.every or (step + 1) % self.every or env.strategy == "fsdp2":
            return {}
        split = self._split_replay(run, batch)
        empty = batch.fresh[:0]
        earlier, current = split if split is not None else (empty, empty)
        # Under DDP the ranks meet in all-reduces below, so they must all take the same branch:
        # decide on the global counts, every rank's replayed rows together.
        n_earlier, n_current = _global_counts(env, [len(earlier), len(current)])
        if n_earlier:
            ref, kind = earlier, "replay"
        else:
            probe = self._probe(run, batch)  # the same rows on every rank: split them
            if probe is None:  # no gradient to compare: the row losses alone, from their own pass
                return row_losses(run, {"fresh": batch.fresh, "replay_current": current})
            ref, kind = (probe[env.rank :: env.world_size] if env.active else probe), "probe"
        from cptrain.train.alignment import all_reduce_sum, gradient_alignments

        device = env.device
        rows = [ref]
        if n_current:
            rows.append(current)  # the current task's replayed rows, logged beside
        measured = gradient_alignments(
            run.model,
            torch.from_numpy(batch.fresh).to(device),
            [torch.from_numpy(r).to(device) for r in rows],
            autocast_dtype=run.autocast,
            reduce=all_reduce_sum if env.active else None,
        )
        out: dict[str, Any] = measured[0]  # loss_fresh among them: the row losses come with the
        out["grad_cos_fresh_rows"] = out.pop("rows_fresh")  # gradients' forward passes
        out["grad_cos_ref_rows"] = out.pop("rows_replay")
        out["grad_ref"] = kind
        if kind == "replay":
            out["loss_replay_earlier"] = out["loss_replay"]
        if n_earlier + n_current:
            out["replay_current_share"] = n_current / (n_earlier + n_current)
        if n_current:
            out["loss_replay_current"] = measured[1]["loss_replay"]
            out["grad_cos_current"] = measured[1]["grad_cos"]
            out["grad_cos_current_ref_rows"] = measured[1]["rows_replay"]
        if batch.task > 0 and math.isfinite(out["grad_cos"]):
            self.cos_sum += out["grad_cos"]
            self.cos_n += 1
            self.ref_rows_sum += out["grad_cos_ref_rows"]
            self.ref_rows_n += 1
        return out

    def summary(self) -> dict[str, Any]:
        if not self.cos_n:
            return {}
        out: dict[str, Any] = {
            "grad_cos_mean": self.cos_sum / self.cos_n,
            "grad_cos_count": self.cos_n,
        }
        if self.ref_rows_n:
            out["grad_cos_ref_rows_mean"] = self.ref_rows_sum / self.ref_rows_n
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "cos_sum": self.cos_sum,
            "cos_n": self.cos_n,
            "ref_rows_sum": self.ref_rows_sum,
            "ref_rows_n": self.ref_rows_n,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.cos_sum, self.cos_n = float(state["cos_sum"]), int(state["cos_n"])
            # absent from checkpoints written before reference sizes were kept
            self.ref_rows_sum = int(state.get("ref_rows_sum", 0))
            self.ref_rows_n = int(state.get("ref_rows_n", 0))
        except (TypeError, KeyError, ValueError, AttributeError):
            raise CheckpointError(
                "the checkpoint's diagnostics state is damaged; resume from another checkpoint"
            ) from None


def _global_counts(env: Any, counts: list[int]) -> list[int]:
    """``counts`` summed over the ranks (themselves without DDP)."""
    if not env.active:
        return counts
    t = torch.tensor(counts, dtype=torch.float64, device=env.device)
    torch.distributed.all_reduce(t)
    return [int(round(x)) for x in t.tolist()]


@torch.no_grad()
def row_losses(run: RunView, groups: dict[str, np.ndarray]) -> dict[str, float]:
    """``loss_<group>``: the mean token loss of each group of rows at the weights the step
    starts from (one no-grad forward per group; groups empty on every rank are left out).
    Replayed rows the model has trained on before score lower than fresh ones; how much lower
    says how much of a mixed batch's loss, and gradient, comes from repetition."""
    from cptrain.evaluation.losses import token_loss

    env = run.env
    sums = []
    model = run.model
    was_training = model.training
    model.eval()
    try:
        for rows in groups.values():
            total = 0.0
            if len(rows):
                part = torch.from_numpy(rows).to(env.device)
                total = float(token_loss(model, part, run.autocast)) * len(rows)
            sums += [total, float(len(rows))]
    finally:
        model.train(was_training)
    if env.active:
        t = torch.tensor(sums, dtype=torch.float64, device=env.device)
        torch.distributed.all_reduce(t)
        sums = t.tolist()
    return {
        f"loss_{name}": sums[2 * i] / sums[2 * i + 1]
        for i, name in enumerate(groups)
        if sums[2 * i + 1] > 0
    }
