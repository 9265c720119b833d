"""The split of downstream evaluation into task rows, task files, targets and the lm-eval driver
keeps the old import path: code written against ``cptrain.evaluation.downstream`` (the CLI,
other tests, user scripts) still finds every public name there, as the very same object."""

from __future__ import annotations

import importlib

import pytest

MOVED = {
    "cptrain.evaluation.task_items": ["make_choice_items", "make_bpb_docs"],
    "cptrain.evaluation.local_tasks": [
        "LOCAL_TAG", "held_out_documents", "build_local_tasks", "choice_task_name",
        "bpb_task_name",
    ],
    "cptrain.evaluation.targets": ["Target", "resolve_target", "token_counter",
                                   "model_max_length"],
}


@pytest.mark.parametrize(("module", "name"), [(m, n) for m, ns in MOVED.items() for n in ns])
def test_moved_names_are_still_importable_from_downstream(module: str, name: str) -> None:
    downstream = importlib.import_module("cptrain.evaluation.downstream")
    assert getattr(downstream, name) is getattr(importlib.import_module(module), name)
    assert name in downstream.__all__


def test_generating_tasks_does_not_import_the_driver_or_lm_eval() -> None:
    """Task rows and files are made without lm-eval (a machine without it can still build the
    tasks), so those modules must not depend on the driver."""
    import subprocess
    import sys

    code = ("import sys, cptrain.evaluation.local_tasks, cptrain.evaluation.targets; "
            "print('cptrain.evaluation.downstream' in sys.modules, 'lm_eval' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]
