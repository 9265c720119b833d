"""Checkpoints: the on-disk formats (``local``, ``sharded``), the compatibility checks shared
with ``cptrain doctor`` (``compat``), the one Hugging Face export (``export``) and the
``CheckpointManager`` that saves and restores a run's components together (``manager``)."""

from cptrain.checkpoint.local import (
    FORMAT,
    LEGACY_OPTIMIZER_FILE,
    OPTIMIZER_FILE,
    Checkpoint,
    interrupted_resaves,
    latest_complete,
    leftovers,
    list_checkpoints,
    load_checkpoint,
    pack_optimizer,
    prune,
    unpack_optimizer,
    verify,
)

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
