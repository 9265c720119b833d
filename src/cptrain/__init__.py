"""cptrain: continual pre-training of Llama-family models with replay and Reptile.

The public Python API, for a training loop of your own (README "Inside your own training
loop"): ``ReplayBuffer`` (α of each batch replayed from a disk-backed buffer), ``Reptile`` (the
meta-update of MER on your optimizer), ``LossMatrix`` (every task's validation loss before
training and after each task, written as a run directory), ``PreparedData`` (a ``cptrain
prepare`` directory read in ``cptrain train``'s order), ``ArrayWindows`` (your own validation
rows) and ``RunDir`` (the one reader of run directories). For Hugging Face ``transformers``:
``cptrain.integrations.transformers``. Names are imported on first use, so ``import cptrain``
loads no torch.
"""

from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ReplayBuffer": "cptrain.integrations.loop",
    "Reptile": "cptrain.integrations.loop",
    "LossMatrix": "cptrain.integrations.loop",
    "PreparedData": "cptrain.integrations.data",
    "ArrayWindows": "cptrain.integrations.data",
    "RunDir": "cptrain.rundir.run_dir",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    # the public names and the loaded subpackages, not this module's own helpers
    import types

    mods = [n for n, v in globals().items() if isinstance(v, types.ModuleType)]
    return sorted({*__all__, *mods})
