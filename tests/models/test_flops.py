"""Compute accounting: parameter counts against real models, FLOPs per token and per incoming
token under both replay accountings, Reptile's share, all from the facts a summary records."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from cptrain.errors import ConfigError
from cptrain.models.build import PRESETS, llama_config
from cptrain.models.flops import (
    flops_per_token,
    preset_shape,
    run_flops,
    run_shape,
    shape_from_hf_config,
    summary_facts,
)

VOCAB = 4096


def _meta_model(preset: str, vocab: int = VOCAB) -> LlamaForCausalLM:
    with torch.device("meta"):  # shapes only: the 4b preset costs no memory
        return LlamaForCausalLM(llama_config(preset, vocab))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_parameter_counts_match_the_real_model(preset):
    model = _meta_model(preset)
    shape = preset_shape(preset, VOCAB)
    assert shape.total_params() == sum(p.numel() for p in model.parameters())
    embed = model.model.embed_tokens.weight.numel()
    assert shape.nonembedding_params() == shape.total_params() - embed - embed  # untied head


@pytest.mark.parametrize("preset", ["tiny", "1b"])
def test_flops_per_token_counts_every_matmul_weight_and_attention(preset):
    model = _meta_model(preset)
    # Independent count: every 2-D weight except the input embedding takes part in a matmul.
    n = sum(p.numel() for name, p in model.named_parameters()
            if p.ndim == 2 and "embed_tokens" not in name)
    cfg = model.config
    seq = 256
    expected = 6 * n + 6 * cfg.num_hidden_layers * seq * cfg.hidden_size
    assert flops_per_token(preset_shape(preset, VOCAB), seq) == expected


def _summary(alpha=0.0, mode="substitute", method="replay", reptile=False, k=10, steps=90,
             batch=16, seq=128, preset="tiny", updates=None):
    n_replay = 0 if alpha == 0 else (round(alpha * batch) if mode == "substitute" else batch)
    n_fresh = batch - n_replay if mode == "substitute" else batch
    shape = preset_shape(preset, VOCAB)
    updates = (steps // k if reptile else 0) if updates is None else updates
    return {
        "config": {
            "run_dir": "runs/x",
            "method": method,
            "model": {"preset": preset},
            "train": {"batch_size": batch, "seq_len": seq},
            "replay": {"alpha": alpha, "mode": mode},
            "reptile": {"enabled": reptile, "k": k},
        },
        "params": shape.total_params(),
        "steps": steps,
        "fresh_tokens": steps * n_fresh * seq,
        "replay_tokens": steps * n_replay * seq,
        **summary_facts(shape, n_fresh, n_replay, updates),
    }


def test_sequential_run_costs_c_per_token():
    s = _summary()
    f = run_flops(s)
    c = flops_per_token(preset_shape("tiny", VOCAB), 128)
    assert f["flops_per_token"] == c
    assert f["total_flops"] == c * s["fresh_tokens"]
    assert f["flops_per_incoming_token"] == pytest.approx(c)
    assert f["flops_per_fresh_token"] == pytest.approx(c)
    assert f["reptile_flops"] == 0


@pytest.mark.parametrize("mode", ["substitute", "additive"])
def test_half_replay_doubles_flops_per_incoming_token_in_both_accountings(mode):
    s = _summary(alpha=0.5, mode=mode)
    f = run_flops(s)
    c = f["flops_per_token"]
    assert f["flops_per_incoming_token"] == pytest.approx(2 * c)  # C / (1 − α)
    assert f["flops_per_fresh_token"] == pytest.approx(2 * c)
    assert f["replay_fraction"] == pytest.approx(0.5)
    assert f["total_flops"] == c * (s["fresh_tokens"] + s["replay_tokens"])


def test_quarter_replay_substitute_is_c_over_three_quarters():
    f = run_flops(_summary(alpha=0.25))
    assert f["flops_per_incoming_token"] == pytest.approx(f["flops_per_token"] / 0.75)


def test_joint_training_never_counts_replay():
    f = run_flops(_summary(alpha=0.0, method="joint"))
    assert f["flops_per_incoming_token"] == pytest.approx(f["flops_per_token"])


def test_reptile_is_counted_separately_every_k_steps():
    # 95 steps at k=10 allow 9 meta-updates; re-anchoring at task boundaries dropped two
    # partial periods, and the count the trainer recorded is what is charged.
    s = _summary(method="reptile", reptile=True, k=10, steps=95, updates=7)
    f = run_flops(s)
    params = s["params"]
    assert f["reptile_updates"] == 7
    assert f["reptile_flops"] == 3 * params * 7
    assert f["total_flops"] == f["model_flops"] + f["reptile_flops"]
    per_incoming = 3 * params / (10 * 16 * 128)
    assert f["reptile_flops_per_incoming_token"] == pytest.approx(per_incoming)
    assert f["flops_per_incoming_token"] == pytest.approx(f["flops_per_token"] + per_incoming)


def test_the_recorded_shape_is_used_whatever_the_preset():
    # init_from models need not have a preset's shape: the trainer records the real one.
    s = _summary(preset="small")
    s["model_shape"]["vocab"] = 12345
    assert run_shape(s) == preset_shape("small", 12345)
    assert run_flops(s)["params"] == preset_shape("small", 12345).total_params()


def test_the_shape_the_trainer_records_comes_from_the_hf_config():
    model = _meta_model("tiny", vocab=300)
    assert shape_from_hf_config(model.config.to_dict()) == preset_shape("tiny", 300)


def test_the_recorded_batch_mix_is_used():
    s = _summary(alpha=0.25)
    s["rows_per_step"] = {"fresh": 8, "replay": 8}  # not what the config's α would give
    f = run_flops(s)
    assert f["replay_fraction"] == 0.5
    assert f["flops_per_incoming_token"] == pytest.approx(2 * f["flops_per_token"])


@pytest.mark.parametrize("key", ["model_shape", "rows_per_step", "reptile_updates"])
def test_a_summary_of_an_older_cptrain_is_a_one_line_error_naming_the_key(key):
    s = _summary()
    del s[key]
    with pytest.raises(ConfigError) as e:
        run_flops(s)
    msg = str(e.value)
    assert f"the summary of runs/x has no {key}" in msg and "--resume" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("key, value", [("model_shape", {"layers": 2}), ("model_shape", 3),
                                        ("rows_per_step", {"fresh": 0, "replay": 0}),
                                        ("rows_per_step", [16, 0])])
def test_malformed_facts_are_one_line_errors(key, value):
    s = _summary()
    s[key] = value
    with pytest.raises(ConfigError, match=f"the run's summary: {key} is") as e:
        run_flops(s)
    assert "\n" not in str(e.value)
