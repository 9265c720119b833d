"""Anchors to the start model, for continuing a model whose pre-training data is not at hand:
a KL term toward the start model's next-token distributions (``kl``; ``topk`` keeps them with
the buffer's seed rows) and decoupled L2 toward its weights (``l2``). ``config`` is torch-free;
the trainer builds the start model and wires both in (``cptrain.train.objective``)."""
