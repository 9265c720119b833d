"""cptrain's replay, Reptile and loss matrix inside a training loop someone else owns.

``data`` (prepared token windows in the order ``cptrain train`` reads them), ``loop`` (the
public facades ``cptrain`` exports: ``ReplayBuffer``, ``Reptile``, ``LossMatrix``) and
``transformers`` (a replay-mixing dataset, Reptile and loss-matrix callbacks and a ``Trainer``
subclass for Hugging Face ``transformers``). Each reuses the components ``cptrain train``
runs; nothing here reimplements a buffer, a mix or a meta-update.
"""
