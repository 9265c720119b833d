"""Llama models built from a preset (shapes in ``cptrain.presets``) and loading of pretrained
Hugging Face checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cptrain.errors import CheckpointError, ConfigError
from cptrain.presets import PRESETS


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


def model_for_run(
    preset: str, init_from: str | None, vocab_size: int, *, seed: int, seq_len: int
) -> LlamaForCausalLM:
    """A run's starting model: ``init_from`` weights, else a fresh preset sized to the data."""
    if init_from:
        model = load_pretrained(init_from)
    else:
        model = build_model(preset, vocab_size, seed=seed, max_positions=max(2048, seq_len))
    if model.config.vocab_size < vocab_size:
        from cptrain.errors import DataError

        raise DataError(
            f"the shards use a vocabulary of {vocab_size} but the model's embedding has "
            f"{model.config.vocab_size} rows; prepare the data with the model's tokenizer"
        )
    return model
