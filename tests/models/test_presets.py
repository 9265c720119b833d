"""Model presets by name (``cptrain.models.presets``): every shape has its default learning
rate, its heads divide its width, the CPU-sized MLPs follow Llama's 8/3·d rule, the paired CPU
presets differ ~2× in size, and the module is plain data that loads no torch."""

from __future__ import annotations

import math
import subprocess
import sys

import torch
from transformers import LlamaForCausalLM

from cptrain.models.build import count_parameters, llama_config
from cptrain.models.presets import DEFAULT_LR, PRESETS

CPU_PRESETS = ("nano", "micro", "tiny", "mini", "small")


def test_every_preset_has_a_default_learning_rate() -> None:
    assert list(DEFAULT_LR) == list(PRESETS)
    assert all(0 < lr < 0.01 for lr in DEFAULT_LR.values())


def test_heads_divide_the_width_into_even_head_dims() -> None:
    for name, s in PRESETS.items():
        assert s.hidden % s.heads == 0, name
        assert (s.hidden // s.heads) % 2 == 0, name  # RoPE rotates pairs of dimensions
        assert s.layers > 0 and s.ffn > s.hidden, name


def test_cpu_presets_follow_the_eight_thirds_mlp_rule() -> None:
    for name in CPU_PRESETS:
        s = PRESETS[name]
        assert s.ffn == 8 * math.ceil(8 * s.hidden / 3 / 8), name  # rounded up to 8


def test_paired_cpu_presets_double_the_parameters_at_the_demo_vocabulary() -> None:
    with torch.device("meta"):
        n = {p: count_parameters(LlamaForCausalLM(llama_config(p, 4096)))
             for p in ("nano", "micro", "tiny", "mini")}
    assert 1.8 < n["mini"] / n["tiny"] < 2.2
    assert 1.8 < n["micro"] / n["nano"] < 2.2


def test_presets_are_plain_data_without_torch() -> None:
    code = "import sys, cptrain.models.presets; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False"]
