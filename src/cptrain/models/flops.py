"""Compute accounting: training FLOPs per token, per run, and per *incoming* (fresh) token.

Convention (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1; the same
6·N rule Chinchilla's Eq. 1 uses, with the attention term kept because our CPU models are small
enough for it to matter):

    training FLOPs per processed token  C = 6·N + 6·L·T·d

* ``N`` = parameters used in matrix multiplies for every token: the transformer blocks'
  projection weights (attention q/k/v/o and the gated MLP's gate/up/down) **plus the output
  head** (untied, V·d). The input embedding is a table lookup and costs no FLOPs; RMSNorm gains
  and element-wise work are left out (negligible, as in Kaplan). The output head is kept
  because with a 4k vocabulary it is most of a 1.5M-parameter model's work.
* ``6·L·T·d``: attention scores (QKᵀ) and their weighted sum (AV) cost 2·2·d multiply-adds per
  attended position per layer in the forward pass; under the causal mask a token attends to T/2
  positions on average, so the forward cost is 2·L·T·d and training (forward + backward = 3×)
  is 6·L·T·d. ``T`` is the training sequence length; ``d`` here is the attention width
  heads·head_dim, the hidden size except where a config sets its own ``head_dim`` (Gemma,
  Qwen3), which also sizes the q/k/v/o projections.
* Forward + backward = 3 × forward (the factor 6 = 2 FLOPs per multiply-add × 3).

Per run: C × (fresh + replayed tokens processed). Reptile's meta-update
θ ← θ₀ + ε(θ − θ₀) costs 3·|θ| FLOPs every k optimizer steps; it is counted separately (it is
tiny), once per meta-update the run did, and added to the total. The KL anchor's start model
runs forward passes only: C/3 per token it ran on (``teacher_tokens``, counted by the trainer,
seed rows' stored top-k targets included), added to the total. Evaluation FLOPs are not
counted: they are the same for every method.

FLOPs per *incoming* token (the x-axis of the paper's Fig. 6): the compute spent per token of
the incoming task stream. With a replay fraction α of each batch, every fresh token costs
C·(rows per step)/(fresh rows per step): C/(1−α) in *substitute* mode (batch fixed, α of it
replayed) and likewise in *additive* mode (B fresh rows plus α/(1−α)·B replayed), plus
Reptile's 3·|θ|/k per step spread over the step's fresh tokens, plus the start model's forward
FLOPs of the run spread over its fresh tokens.

A run's accounting uses only facts its trainer recorded in the run's summary (see
``summary_facts``): the model's shape, the fresh/replayed rows of a step and the number of
meta-updates; nothing is re-derived from the config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from cptrain.errors import ConfigError
from cptrain.models.presets import PRESETS

CONVENTION = "C = 6N + 6LTd (Kaplan et al. 2020; N = block matmul weights + output head)"
REPTILE_FLOPS_PER_PARAM = 3  # one subtract, one multiply, one add per weight


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    ffn: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = False
    # Width of one attention head: hidden // heads unless the config says otherwise (Gemma's
    # and Qwen3's may be wider or narrower). None (a summary of an older cptrain) means the
    # default.
    head_dim: int | None = None
    # d×ffn matrices per MLP: 3 for a gated one (Llama, Mistral, Qwen, Gemma, Phi-3), 2 for
    # GPT-2, OPT, BLOOM, Falcon, GPT-J, GPT-NeoX.
    mlp_mats: int = 3

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @property
    def attn_width(self) -> int:
        """Width of the concatenated query heads (``heads · head_dim``; ``hidden`` usually)."""
        return self.heads * int(self.head_dim or 0)

    def block_matmul_params(self) -> int:
        """q/o are d×(heads·head_dim); k/v are d×(kv_heads·head_dim); the MLP has
        ``mlp_mats`` d×ffn matrices."""
        d = self.hidden
        kv = self.kv_heads * int(self.head_dim or 0)
        return self.layers * (2 * d * self.attn_width + 2 * d * kv + self.mlp_mats * d * self.ffn)

    def total_params(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.block_matmul_params() + norms + embeddings

    def nonembedding_params(self) -> int:
        return self.block_matmul_params() + (2 * self.layers + 1) * self.hidden

    def matmul_params(self) -> int:
        """N of the 6·N rule: block weights plus the output head (tied or not, it is a matmul)."""
        return self.block_matmul_params() + self.vocab * self.hidden


def preset_shape(preset: str, vocab: int) -> ModelShape:
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    s = PRESETS[preset]
    return ModelShape(s.layers, s.hidden, s.ffn, vocab, s.heads, s.heads)


# Each shape key and the names other decoder families give it (GPT-2, GPT-J, BLOOM, OPT,
# Falcon, GPT-NeoX); the first present wins.
_HF_KEYS = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "heads": ("num_attention_heads", "n_head"),
    "vocab": ("vocab_size",),
}
_FFN_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size")
# Families whose MLP is two matrices (up, down) rather than a gated three.
_UNGATED = {"gpt2", "gptj", "gpt_neox", "opt", "bloom", "falcon", "gpt_bigcode", "codegen",
            "gpt_neo", "phi"}


def _first(cfg: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((cfg[k] for k in keys if cfg.get(k) is not None), None)


def shape_from_hf_config(cfg: dict[str, Any]) -> ModelShape:
    """The shape of a decoder-only model from its Hugging Face config (``config.to_dict()``):
    Llama, Mistral, Qwen2/3, Gemma and the like, GPT-2-style families by their own key names
    (``_HF_KEYS``); a multimodal config's ``text_config``."""
    if isinstance(cfg.get("text_config"), dict) and "num_hidden_layers" not in cfg:
        cfg = cfg["text_config"]
    found = {name: _first(cfg, keys) for name, keys in _HF_KEYS.items()}
    missing = [keys[0] for name, keys in _HF_KEYS.items() if found[name] is None]
    if missing:
        raise ConfigError(
            f"the model's config has no {', '.join(missing)} (or another family's name for "
            "it): cptrain cannot count its FLOPs"
        )
    heads, hidden = int(found["heads"]), int(found["hidden"])
    # GPT-2 and GPT-J leave n_inner null for 4·d; OPT, Falcon and BLOOM name it or imply 4·d
    ffn = int(_first(cfg, _FFN_KEYS) or 4 * hidden)
    kv = cfg.get("num_key_value_heads") or cfg.get("num_kv_heads")
    if kv is None and cfg.get("multi_query"):
        kv = 1  # Falcon's multi-query attention
    return ModelShape(
        layers=int(found["layers"]),
        hidden=hidden,
        ffn=ffn,
        vocab=int(found["vocab"]),
        heads=heads,
        kv_heads=int(kv or heads),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        mlp_mats=2 if cfg.get("model_type") in _UNGATED else 3,
    )


def flops_per_token(shape: ModelShape, seq_len: int) -> int:
    """Training FLOPs per processed token: 6·N + 6·L·T·d (see the module docstring)."""
    return 6 * shape.matmul_params() + 6 * shape.layers * seq_len * shape.attn_width


def summary_facts(
    shape: ModelShape, n_fresh: int, n_replay: int, reptile_updates: int
) -> dict[str, Any]:
    """What the trainer writes into the run's summary for ``run_flops`` to read: the model's
    shape, the global batch mix of a step at full buffer and the meta-updates done."""
    return {
        "model_shape": asdict(shape),
        "rows_per_step": {"fresh": int(n_fresh), "replay": int(n_replay)},
        "reptile_updates": int(reptile_updates),
    }


def _recorded(summary: dict[str, Any], key: str) -> Any:
    if key not in summary:
        run = summary.get("config", {}).get("run_dir") or "this run"
        raise ConfigError(
            f"the summary of {run} has no {key}; it was written by an older cptrain: re-run "
            "`cptrain train --resume` to rewrite it"
        )
    return summary[key]


def _malformed(key: str, value: Any) -> ConfigError:
    return ConfigError(
        f"the run's summary: {key} is {value!r}, not what cptrain writes; re-run `cptrain train "
        "--resume` to rewrite it"
    )


def run_shape(summary: dict[str, Any]) -> ModelShape:
    """The trained model's shape as the trainer recorded it (``model_shape``)."""
    raw = _recorded(summary, "model_shape")
    try:
        return ModelShape(**raw)
    except TypeError:  # not a mapping, or other keys than ModelShape's
        raise _malformed("model_shape", raw) from None


def recorded_rows_per_step(summary: dict[str, Any]) -> tuple[int, int]:
    """(fresh rows, replayed rows) of one optimizer step at full buffer, as the run mixed."""
    raw = _recorded(summary, "rows_per_step")
    try:
        n_fresh, n_replay = int(raw["fresh"]), int(raw["replay"])
    except (TypeError, KeyError, ValueError):
        raise _malformed("rows_per_step", raw) from None
    if n_fresh < 1 or n_replay < 0:
        raise _malformed("rows_per_step", raw)
    return n_fresh, n_replay


def rows_per_step(config: dict[str, Any]) -> tuple[int, int]:
    """(fresh rows, replayed rows) a config will mix per step at full buffer (for plans; a
    finished run's own record is ``recorded_rows_per_step``)."""
    from cptrain.replay.mixer import mix_counts

    batch = int(config["train"]["batch_size"])
    replay = config.get("replay", {})
    return mix_counts(float(replay.get("alpha", 0.0)), batch, replay.get("mode", "substitute"))


def run_flops(summary: dict[str, Any]) -> dict[str, Any]:
    """Compute accounting of one run from its summary (see the module docstring);
    a ConfigError names what a summary of an older cptrain lacks."""
    cfg = summary["config"]
    shape = run_shape(summary)
    seq_len = int(cfg["train"]["seq_len"])
    per_token = flops_per_token(shape, seq_len)
    fresh = int(summary.get("fresh_tokens", 0))
    processed = fresh + int(summary.get("replay_tokens", 0))
    steps = int(summary.get("steps", 0))
    params = shape.total_params()

    reptile = cfg.get("reptile", {})
    k = int(reptile.get("k", 0)) if reptile.get("enabled") else 0
    reptile_updates = int(_recorded(summary, "reptile_updates"))
    reptile_total = REPTILE_FLOPS_PER_PARAM * params * reptile_updates
    model_total = per_token * processed
    teacher_tokens = int(summary.get("teacher_tokens", 0))  # runs before the KL anchor: none
    teacher_total = per_token * teacher_tokens // 3
    total = model_total + reptile_total + teacher_total

    n_fresh, n_replay = recorded_rows_per_step(summary)
    fresh_per_step = n_fresh * seq_len
    reptile_per_incoming = REPTILE_FLOPS_PER_PARAM * params / (k * fresh_per_step) if k else 0.0
    return {
        "convention": CONVENTION,
        "params": params,
        "params_nonembedding": shape.nonembedding_params(),
        "params_matmul": shape.matmul_params(),
        "seq_len": seq_len,
        "flops_per_token": per_token,
        "tokens_processed": processed,
        "model_flops": model_total,
        "reptile_updates": reptile_updates,
        "reptile_flops": reptile_total,
        "teacher_tokens": teacher_tokens,
        "teacher_flops": teacher_total,
        "total_flops": total,
        "flops_per_step": total / steps if steps else None,
        "flops_per_fresh_token": total / fresh if fresh else None,
        "replay_fraction": n_replay / (n_fresh + n_replay),
        "flops_per_incoming_token": per_token * (n_fresh + n_replay) / n_fresh
        + reptile_per_incoming
        + (teacher_total / fresh if fresh else 0.0),
        "reptile_flops_per_incoming_token": reptile_per_incoming,
    }


def planned_flops(config: dict[str, Any], vocab: int, total_steps: int) -> float:
    """FLOPs a run will spend (for ETAs before it has a summary)."""
    shape = preset_shape(config["model"]["preset"], vocab)
    n_fresh, n_replay = rows_per_step(config)
    seq_len = int(config["train"]["seq_len"])
    return float(flops_per_token(shape, seq_len) * (n_fresh + n_replay) * seq_len * total_steps)
