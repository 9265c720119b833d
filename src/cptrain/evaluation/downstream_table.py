"""Downstream scores of a starting model and of the runs continued from it, side by side.

The same local items (same held-out documents, seed, item count and context length) score every
model, so a difference between two rows is the models', not the items'.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cptrain.evaluation.downstream import run_downstream
from cptrain.evaluation.local_tasks import bpb_task_name, choice_task_name


def before_after_scores(
    start_model: Path,
    runs: Mapping[str, Path],
    *,
    tasks: Sequence[str],
    data_dir: Path,
    out_dir: Path,
    items: int,
    max_length: int,
    batch_size: int = 16,
    bpb: bool = True,
) -> list[dict[str, Any]]:
    """One row per model ("before" = ``start_model``, then each run's final model): choice
    accuracy and (with ``bpb``) bits per byte on every prepared task in ``tasks``."""
    kinds = (choice_task_name, bpb_task_name) if bpb else (choice_task_name,)
    names = [f(t) for t in tasks for f in kinds]
    common = {"tasks": names, "items": items, "max_length": max_length,
              "batch_size": batch_size}
    records = [("before", run_downstream(start_model, data_dir=data_dir,
                                         out_dir=out_dir / "before", **common))]
    records += [(label, run_downstream(run, **common)) for label, run in runs.items()]
    rows = []
    for label, rec in records:
        row: dict[str, Any] = {"model": label, "model_dir": rec["model_dir"]}
        for t in tasks:
            row[f"{t} acc"] = rec["tasks"][choice_task_name(t)]["acc"]
            if bpb:
                row[f"{t} bpb"] = rec["tasks"][bpb_task_name(t)]["bits_per_byte"]
        rows.append(row)
    return rows


def scores_table(rows: Sequence[dict[str, Any]], tasks: Sequence[str]) -> str:
    """Plain-text table: accuracy (higher is better) then bits per byte (lower is better)."""
    heads = [h for h in [f"{t} acc" for t in tasks] + [f"{t} bpb" for t in tasks]
             if all(h in r for r in rows)]
    name_w = max([8, *(len(r["model"]) + 2 for r in rows)])
    widths = [max(len(h), 6) + 2 for h in heads]
    lines = ["model".ljust(name_w) + "".join(h.rjust(w) for h, w in zip(heads, widths,
                                                                         strict=True))]
    for r in rows:
        lines.append(r["model"].ljust(name_w) + "".join(
            f"{r[h]:.3f}".rjust(w) for h, w in zip(heads, widths, strict=True)))
    return "\n".join(lines)
