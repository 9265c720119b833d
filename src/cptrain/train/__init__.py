"""Training: the loop (``trainer``), its counters (``state``), what each step trains on
(``batches``), what happens around the loop (``hooks``) and the run directory (``run_dir``)."""

from cptrain.train.trainer import Trainer, train

__all__ = ["Trainer", "train"]
