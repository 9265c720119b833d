"""Llama model presets and loading of pretrained Hugging Face checkpoints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cptrain.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    ffn: int


# The paper's shapes (DESIGN.md §3) plus two CPU-sized ones whose MLP follows Llama's 8/3·d rule.
PRESETS: dict[str, Shape] = {
    "tiny": Shape(layers=2, hidden=128, heads=4, ffn=344),
    "small": Shape(layers=4, hidden=256, heads=4, ffn=688),
    "99m": Shape(layers=16, hidden=512, heads=8, ffn=1280),
    "560m": Shape(layers=24, hidden=1024, heads=16, ffn=2560),
    "1b": Shape(layers=24, hidden=1792, heads=28, ffn=5120),
    "4b": Shape(layers=30, hidden=3072, heads=24, ffn=9216),
}


def llama_config(preset: str, vocab_size: int, max_positions: int = 2048) -> LlamaConfig:
    if preset not in PRESETS:
        raise ConfigError(
            f"model.preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}"
        )
    s = PRESETS[preset]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden,
        intermediate_size=s.ffn,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def build_model(
    preset: str, vocab_size: int, *, seed: int = 0, max_positions: int = 2048
) -> LlamaForCausalLM:
    """A freshly initialised model; the init depends only on ``seed``."""
    cfg = llama_config(preset, vocab_size, max_positions)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model


def load_pretrained(path: str | Path) -> LlamaForCausalLM:
    """Weights only (``init_from``): a Hugging Face ``save_pretrained`` directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"init_from: {path} is not a Hugging Face model directory (no config.json); "
            "point it at a save_pretrained directory"
        )
    try:
        # safetensors only: pickled .bin weights could run code on load
        model = LlamaForCausalLM.from_pretrained(
            path, torch_dtype=torch.float32, use_safetensors=True
        )
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"init_from: cannot load {path}: {first}") from None
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
