"""Can this checkpoint be resumed by this run? One set of checks for ``--resume`` and doctor.

Each check returns None when compatible, else the problem in words; the trainer raises it with
its fix, ``cptrain doctor`` reports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def world_size_problem(name: str, saved: int, now: int) -> str | None:
    if saved == now:
        return None
    return (
        f"checkpoint {name} was written by {saved} process(es) but this run has {now}; resume "
        f"with the same count (torchrun --nproc_per_node={saved}), re-sharding on resume is "
        "not supported"
    )


def tokenizer_problem(trained: str | None, data: str, data_dir: Path | str) -> str | None:
    """The tokenizer a checkpoint was trained with against the one of the prepared data."""
    if trained is None or trained == data:
        return None
    return (
        f"the checkpoint was trained with tokenizer {trained[:12]} but {data_dir} holds "
        f"tokenizer {data[:12]}: the data was re-prepared; resume with the data the run was "
        "prepared with"
    )


def vocab_problem(rows: int, vocab: int, data_dir: Path | str) -> str | None:
    """A checkpoint's embedding rows against the vocabulary of the run's shards."""
    if rows == vocab:
        return None
    return (
        f"the checkpoint's embedding has {rows} rows but the shards in {data_dir} use a "
        f"vocabulary of {vocab}; resume with the data the run was prepared with"
    )


def sharding_problem(path: Path, state: dict[str, Any], distributed: bool) -> str | None:
    if bool(state.get("sharded")) == distributed:
        return None
    if distributed:
        return (
            f"{path} was written by a single-process run; resume it without torchrun "
            "(distributed.strategy=none)"
        )
    return f"{path} holds sharded (torchrun) state; resume it with torchrun"


def check_resume(
    path: Path,
    state: dict[str, Any],
    *,
    config: dict[str, Any],
    world_size: int,
    distributed: bool,
    model_vocab: int,
    checkpoint_vocab: int,
    identity: dict[str, str],
    data_dir: Path | str,
    allow_config_change: bool = False,
) -> None:
    """Raise the first reason why this run cannot resume checkpoint ``path`` (whose state.json
    is ``state``); with ``allow_config_change`` config differences are only printed.
    ``identity``: the data's tokenizer_sha256 and data_sha256 (``TrainingData.identity``)."""
    from cptrain.errors import CheckpointError, DataError

    problem = world_size_problem(
        path.name, int(state.get("world_size", 1)), world_size
    ) or sharding_problem(path, state, distributed)
    if problem:
        raise CheckpointError(problem)
    from cptrain.config import config_differences

    diffs = config_differences(state["config"], config)
    moved = [d for d in diffs if d.startswith("data.dir:")]
    if moved and state.get("data_sha256") == identity["data_sha256"]:
        # the same shards, byte for byte, at another path: the run is unchanged
        print(f"the prepared data moved ({moved[0]}); its shards match the checkpoint's sha256")
        diffs = [d for d in diffs if d not in moved]
    elif moved and "data_sha256" not in state:
        moved[0] += (" (this checkpoint predates data checksums: if the new directory is a "
                     "byte-identical copy, pass --allow-config-change)")
        diffs = [moved[0] if d.startswith("data.dir:") else d for d in diffs]
    if diffs and allow_config_change:
        for d in diffs:
            print(f"warning: resuming with a changed config: {d}")
    elif diffs:
        more = f"; {len(diffs) - 1} more" if len(diffs) > 1 else ""
        raise CheckpointError(
            f"--resume: the config changed in a way that changes results ({diffs[0]}{more}); "
            "restore the old value or start a new run_dir (or pass --allow-config-change to "
            "resume anyway)"
        )
    problem = vocab_problem(checkpoint_vocab, model_vocab, data_dir) or tokenizer_problem(
        state.get("tokenizer_sha256"), identity["tokenizer_sha256"], data_dir
    )
    if problem:
        raise DataError(problem)
    saved = state.get("data_sha256", identity["data_sha256"])
    if not moved and saved != identity["data_sha256"]:
        # The same path, other shards (prepared again in place): the run would change silently.
        change = (f"data_sha256: checkpoint has {saved[:12]}…, the shards in {data_dir} have "
                  f"{identity['data_sha256'][:12]}…")
        if not allow_config_change:
            raise CheckpointError(
                f"--resume: the prepared data changed in place ({change}); restore the data the "
                "run trained on or start a new run_dir (or pass --allow-config-change to resume "
                "anyway)"
            )
        print(f"warning: resuming with changed data: {change}")
