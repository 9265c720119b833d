"""Checkpoints: the on-disk formats (``local``, ``sharded``), the compatibility checks shared
with ``cptrain doctor`` (``compat``), the one Hugging Face export (``export``) and the
``CheckpointManager`` that saves and restores a run's components together (``manager``)."""

from typing import Any

from cptrain.rundir.layout import list_checkpoints


def __getattr__(name: str) -> Any:
    # The rest of __all__ loads torch: imported on first use, so that torch-free modules (the
    # run directory's checks before training) can use this package.
    if name in __all__:
        from cptrain.checkpoint import local

        return getattr(local, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FORMAT",
    "LEGACY_OPTIMIZER_FILE",
    "OPTIMIZER_FILE",
    "Checkpoint",
    "interrupted_resaves",
    "latest_complete",
    "leftovers",
    "list_checkpoints",
    "load_checkpoint",
    "pack_optimizer",
    "prune",
    "unpack_optimizer",
    "verify",
]
