"""Model presets by name: the Llama shapes and their default peak learning rates.

Plain data without torch, so that configs, sweeps, FLOP counts and reports can use it cheaply;
``cptrain.models.build`` turns a preset into a ``LlamaConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    ffn: int


# The paper's shapes (DESIGN.md §3) plus CPU-sized ones whose MLP follows Llama's 8/3·d rule.
# With the demo's 4,096-token vocabulary mini has ~2× tiny's parameters and micro ~2× nano's:
# pairs for size against replay at equal FLOPs (recipes/study-size-vs-replay*.yaml). nano is
# small enough to be capacity-bound within a million tokens, a budget 2 CPU cores train quickly.
PRESETS: dict[str, Shape] = {
    "nano": Shape(layers=2, hidden=32, heads=2, ffn=88),
    "micro": Shape(layers=2, hidden=60, heads=2, ffn=160),
    "tiny": Shape(layers=2, hidden=128, heads=4, ffn=344),
    "mini": Shape(layers=4, hidden=176, heads=4, ffn=472),
    "small": Shape(layers=4, hidden=256, heads=4, ffn=688),
    "99m": Shape(layers=16, hidden=512, heads=8, ffn=1280),
    "560m": Shape(layers=24, hidden=1024, heads=16, ffn=2560),
    "1b": Shape(layers=24, hidden=1792, heads=28, ffn=5120),
    "4b": Shape(layers=30, hidden=3072, heads=24, ffn=9216),
}

# Peak learning rates: the paper's per size (DESIGN.md §3); CPU presets measured on the demo.
DEFAULT_LR: dict[str, float] = {
    "nano": 4e-3,
    "micro": 4e-3,
    "tiny": 2e-3,
    "mini": 2e-3,
    "small": 1e-3,
    "99m": 4e-4,
    "560m": 2.8e-4,
    "1b": 2.2e-4,
    "4b": 1.5e-4,
}
