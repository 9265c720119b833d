"""The regularize: section: method presets, one-line errors, and dumps of runs without it."""

from __future__ import annotations

import pytest

from cptrain.config import METHODS, RunConfig, config_differences
from cptrain.config_base import build_config
from cptrain.errors import ConfigError

BASE = {"run_dir": "runs/x", "data": {"dir": "d", "tasks": ["en", "fr"]}}
SEED = [{"source": "task", "task": "en", "tokens": 256}]


def make(**changes):
    return build_config(RunConfig, {**BASE, **changes}, source="cfg")


def test_anchor_methods_set_their_weights_and_explicit_keys_win():
    assert make(method="kl").regularize.kl_to_start.weight == METHODS["kl"].kl == 1.0
    assert make(method="l2").regularize.l2_to_start.weight == METHODS["l2"].l2 > 0
    both = make(method="kl-replay")
    assert both.replay.alpha == 0.25 and both.regularize.kl
    tuned = make(method="kl", regularize={"kl_to_start": {"weight": 0.3, "rows": "all"}})
    assert tuned.regularize.kl_to_start.weight == 0.3
    # a method's preset leaves the other anchor off
    assert not make(method="kl").regularize.l2 and not make(method="replay").regularize.kl


def test_a_run_without_anchors_dumps_as_before_the_section_existed():
    plain = make(method="mer").model_dump(mode="json")
    assert "regularize" not in plain
    anchored = make(method="kl").model_dump(mode="json")
    assert anchored["regularize"]["kl_to_start"] == {"weight": 1.0, "rows": "all"}
    # an older checkpoint's config (no section) resumes a run without anchors, not one with
    assert config_differences(plain, make(method="mer").model_dump(mode="json")) == []
    assert config_differences(plain, {**plain, "regularize": anchored["regularize"]})


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"regularize": {"kl_to_start": {"weight": -1}}},
         "regularize.kl_to_start.weight: must be >= 0.0 (got -1)"),
        ({"regularize": {"l2_to_start": {"weight": -0.5}}},
         "regularize.l2_to_start.weight: must be >= 0.0 (got -0.5)"),
        ({"regularize": {"kl_to_start": {"weight": 1, "top_k": 0}}},
         "regularize.kl_to_start.top_k: must be >= 1 (got 0)"),
        ({"method": "kl", "regularize": {"kl_to_start": {"top_k": 8, "rows": "seed"}}},
         "keeps the start model's targets with the replay buffer's seed rows"),
        ({"method": "kl-replay", "regularize": {"kl_to_start": {"top_k": 8, "rows": "seed"}}},
         "set replay.alpha > 0 and replay.seed, or drop top_k"),
        ({"method": "kl-replay", "replay": {"seed": SEED},
          "regularize": {"kl_to_start": {"top_k": 8}}}, "set regularize.kl_to_start.rows: seed"),
        ({"method": "kl", "regularize": {"kl_to_start": {"rows": "replay"}}},
         "rows: replay needs replayed rows"),
        ({"method": "kl-replay", "regularize": {"kl_to_start": {"rows": "seed"}}},
         "rows: seed needs replay.seed rows"),
        ({"regularize": {"kl_to_start": {"rows": "fresh"}}}, "regularize.kl_to_start.rows"),
        ({"method": "kl-replay", "replay": {"seed": SEED}, "distributed": {"strategy": "fsdp2"},
          "regularize": {"kl_to_start": {"top_k": 8, "rows": "seed"}}},
         "top_k computes its targets with the unsharded model"),
        ({"method": "l2", "train": {"lr": 1e-3}, "regularize": {"l2_to_start": {"weight": 2000}}},
         "weight × train.lr = 2 > 1 pulls the weights past the start model every step; use a "
         "weight ≤ 1000"),
    ],
)
def test_bad_anchor_values_get_one_line_errors(changes, fragment):
    with pytest.raises(ConfigError) as err:
        make(**changes)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_top_k_on_seed_rows_of_a_replaying_run_is_valid():
    cfg = make(method="kl-replay", replay={"seed": SEED},
               regularize={"kl_to_start": {"top_k": 8, "rows": "seed"}})
    assert cfg.regularize.kl_to_start.top_k == 8
