"""Training: the loop (``trainer``), its counters (``state``), what each step trains on
(``batches``), what happens around the loop (``hooks``) and the run directory (``run_dir``).

``Trainer`` and ``train`` are imported on first use: the torch-free parts (``data``,
``run_dir``, ``preflight``) check a run before ``cptrain train`` spends seconds importing torch.
"""

from typing import Any

__all__ = ["Trainer", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from cptrain.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
