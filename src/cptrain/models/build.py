"""Llama models built from a preset (shapes in ``cptrain.models.presets``) and loading of pretrained
checkpoints (``model.init_from``): any Hugging Face directory of a decoder-only causal LM that
``AutoModelForCausalLM`` loads (Llama, Mistral, Qwen2, Gemma, …), or a ``.gguf`` file, which is
dequantized to fp32 in memory. A loaded model keeps its own architecture as saved: tied
embeddings, grouped-query attention, RoPE and norm settings."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cptrain.data.tokenizer import require_gguf
from cptrain.errors import CheckpointError, ConfigError
from cptrain.models.presets import PRESETS

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from cptrain.config import RunConfig

GGUF_MAGIC = b"GGUF"
_CAUSAL_EXAMPLES = "e.g. Llama, Mistral, Qwen2 or Gemma"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


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


# ------------------------------------------------------------------ pretrained weights
def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def check_causal_lm(config: PretrainedConfig, where: str) -> None:
    """Refuse a config that is not a decoder-only causal LM (an encoder such as BERT, whose
    ``BertLMHeadModel`` ``AutoModelForCausalLM`` would build too, or an encoder-decoder)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    kind = str(getattr(config, "model_type", "") or "unknown")
    archs = [str(a) for a in (getattr(config, "architectures", None) or [])]
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    decoder_only = (
        kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and kind not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
        and not getattr(config, "is_encoder_decoder", False)
        and (not archs or any(a in causal_classes for a in archs))
    )
    if not decoder_only:
        named = f" ({', '.join(archs)})" if archs else ""
        raise CheckpointError(
            f"init_from: {where} is a {kind} model{named}, not a decoder-only causal LM; point "
            f"init_from at one that AutoModelForCausalLM loads ({_CAUSAL_EXAMPLES})"
        )


def _from_pretrained(source: str | Path, **kwargs: Any) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` in fp32 with SDPA attention where the
    architecture has it (the eager kernel otherwise); never remote code."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32, "trust_remote_code": False, **kwargs}
    try:
        return AutoModelForCausalLM.from_pretrained(source, attn_implementation="sdpa", **kwargs)
    except ValueError as exc:
        if "sdpa" not in str(exc).lower() and "scaled_dot_product" not in str(exc):
            raise
    return AutoModelForCausalLM.from_pretrained(source, **kwargs)


def _load_directory(path: Path) -> PreTrainedModel:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        what = (
            "tokenizer files but no model"
            if any((path / f).is_file() for f in _TOKENIZER_FILES)
            else "no config.json"
        )
        raise CheckpointError(
            f"init_from: {path} holds {what}; point it at a model directory written by "
            "save_pretrained (config.json + *.safetensors) or at a .gguf file"
        )
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"init_from: {path}/config.json: {_first_line(exc)}") from None
    check_causal_lm(config, str(path))
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(
            f"init_from: {path} has no *.safetensors weights; cptrain reads safetensors only "
            "(pickled .bin weights can run code on load): re-save the model with save_pretrained"
        )
    try:
        return _from_pretrained(path, config=config, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"init_from: cannot load {path}: {_first_line(exc)}") from None



def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (read from its header only)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except (KeyError, IndexError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"init_from: {path} is not a readable GGUF file ({_first_line(exc)})"
        ) from None


def _skip_init() -> Any:
    """transformers' context that skips weight initialisation (weights loaded right after)."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a model without the GGUF quantization config (which makes
    ``save_pretrained`` refuse and marks the model as quantized)."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]), _skip_init():
        plain = type(model)(config)
    plain.tie_weights()  # skipped with the init; a tied head must stay one parameter
    plain.load_state_dict(model.state_dict(), strict=True)  # every weight, tied ones once
    return plain.to(torch.float32).eval()


def _dequantize_option() -> dict[str, Any]:
    """Ask for dense weights outright: newer transformers would otherwise keep GGUF blocks
    where a matmul kernel for the device is installed."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_gguf(path: str | Path) -> PreTrainedModel:
    """A GGUF file's weights dequantized to fp32 by transformers, as a plain model."""
    path = Path(path)
    require_gguf()
    try:
        model = _from_pretrained(str(path.parent), gguf_file=path.name, **_dequantize_option())
    except (OSError, ValueError, KeyError) as exc:
        raise _gguf_problem(path, exc) from None
    check_causal_lm(model.config, str(path))
    return _plain_copy(model)


def _gguf_problem(path: Path, exc: BaseException) -> CheckpointError:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    text = str(exc)
    if "not supported" in text:
        known = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
        return CheckpointError(
            f"init_from: {path} is a GGUF of architecture {gguf_architecture(path)!r}, which "
            f"transformers cannot dequantize (it reads {', '.join(known)}); "
            "convert it to a Hugging Face safetensors directory and point init_from there"
        )
    if "Unrecognized configuration class" in text:
        return CheckpointError(
            f"init_from: {path} is a GGUF of architecture {gguf_architecture(path)!r}, not a "
            f"decoder-only causal LM; point init_from at one ({_CAUSAL_EXAMPLES})"
        )
    return CheckpointError(f"init_from: cannot load {path}: {_first_line(exc)}")


def is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def load_pretrained(path: str | Path) -> PreTrainedModel:
    """Weights only (``init_from``): a Hugging Face model directory or a ``.gguf`` file."""
    path = Path(path)
    if path.is_dir():
        return _load_directory(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf" or is_gguf_file(path):
            return load_gguf(path)
        raise CheckpointError(
            f"init_from: {path} is a file but not a GGUF file; point init_from at a Hugging "
            "Face model directory (config.json + *.safetensors) or a .gguf file"
        )
    raise CheckpointError(
        f"init_from: {path} does not exist; point it at a Hugging Face model directory or a "
        ".gguf file (`cptrain models fetch NAME` downloads a released one)"
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_for_run(
    preset: str,
    init_from: str | None,
    vocab_size: int,
    *,
    seed: int,
    seq_len: int,
    separators: tuple[int | None, int | None] = (None, None),
) -> PreTrainedModel:
    """A run's starting model: ``init_from`` weights, else a fresh preset sized to the data.
    ``separators``: the (eos, bos) ids that frame the documents, for ids the model lacks."""
    if init_from:
        model = load_pretrained(init_from)
    else:
        # the context it is trained for, so an exported config says what the model knows (a
        # released model keeps its own: it was pre-trained at that length)
        model = build_model(preset, vocab_size, seed=seed, max_positions=seq_len)
    # Without an EOS id, generate() on an exported model never stops although every training
    # document ended with one. Only ids the model lacks are filled: a released model keeps its own.
    for key, value in zip(("eos_token_id", "bos_token_id"), separators, strict=True):
        for config in (model.config, getattr(model, "generation_config", None)):
            if config is not None and value is not None and getattr(config, key, None) is None:
                setattr(config, key, value)
    if model.config.vocab_size < vocab_size:
        from cptrain.errors import DataError

        raise DataError(
            f"the shards use a vocabulary of {vocab_size} but the model's embedding has "
            f"{model.config.vocab_size} rows; prepare the data with the model's tokenizer"
        )
    return model


def model_for_config(cfg: RunConfig, vocab_size: int,
                     separators: tuple[int | None, int | None] = (None, None)) -> PreTrainedModel:
    """``model_for_run`` with a run config's model, seed and context: the loop's start model,
    and the KL anchor's teacher built again under FSDP2."""
    return model_for_run(cfg.model.preset, cfg.model.init_from, vocab_size, seed=cfg.seed,
                         seq_len=cfg.train.seq_len, separators=separators)
