"""cptrain.checkpoint.compat: may this run resume that checkpoint? (the checks ``--resume``
and ``cptrain doctor`` share)."""

import copy
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_run_config

from cptrain.checkpoint import compat
from cptrain.config import config_differences
from cptrain.errors import CheckpointError, DataError

IDENTITY = {"tokenizer_sha256": "a" * 64, "data_sha256": "b" * 64}
PATH = Path("/runs/r/checkpoints/step_000000010")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("compat")
    return tiny_run_config(root / "run", root / "data").model_dump(mode="json")


def saved_state(config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"format": "cptrain-checkpoint-v1", "step": 10, "world_size": 1,
            "config": copy.deepcopy(config), **IDENTITY, **extra}


def check(state: dict[str, Any], config: dict[str, Any], **kw: Any) -> None:
    args: dict[str, Any] = {
        "config": config, "world_size": 1, "distributed": False, "model_vocab": 512,
        "checkpoint_vocab": 512, "identity": IDENTITY, "data_dir": config["data"]["dir"],
    }
    compat.check_resume(PATH, state, **{**args, **kw})


def changed(config: dict[str, Any], **dotted: Any) -> dict[str, Any]:
    out = copy.deepcopy(config)
    for key, value in dotted.items():
        *sections, leaf = key.split("__")
        d = out
        for s in sections:
            d = d[s]
        d[leaf] = value
    return out


def test_the_same_config_resumes(config):
    check(saved_state(config), copy.deepcopy(config))


@pytest.mark.parametrize(
    ("key", "value"),
    [("train__lr", 1e-2), ("seed", 1), ("model__preset", "mini"), ("replay__alpha", 0.25),
     ("data__tokens_per_task", 4096)],
)
def test_a_result_changing_key_is_refused_by_name(config, key, value):
    dotted = key.replace("__", ".")
    with pytest.raises(CheckpointError) as info:
        check(saved_state(config), changed(config, **{key: value}))
    message = str(info.value)
    assert message.startswith(f"--resume: the config changed in a way that changes results "
                              f"({dotted}: checkpoint has ")
    assert f"config has {value!r})" in message
    assert "--allow-config-change" in message


def test_several_differences_name_the_first_and_count_the_rest(config):
    with pytest.raises(CheckpointError, match=r"\(seed: checkpoint has 0, config has 3; 2 more\)"):
        check(saved_state(config), changed(config, seed=3, train__lr=0.1, train__eps=1e-6))


@pytest.mark.parametrize(
    ("key", "value"),
    [("train__log_every", 100), ("checkpoint__keep_last", 9), ("eval__every", 5),
     ("run_dir", "/elsewhere/run"), ("distributed__backend", "gloo")],
)
def test_run_control_keys_may_change(config, key, value):
    check(saved_state(config), changed(config, **{key: value}))


def test_allow_config_change_prints_instead_of_refusing(config, capsys):
    check(saved_state(config), changed(config, train__lr=0.5), allow_config_change=True)
    assert "warning: resuming with a changed config: train.lr: checkpoint has 0.003, config " \
           "has 0.5" in capsys.readouterr().out


def test_precision_auto_keeps_the_saved_precision(config):
    state = saved_state(changed(config, train__precision="bf16"))
    check(state, changed(config, train__precision="auto"))
    with pytest.raises(CheckpointError, match="train.precision: checkpoint has 'bf16'"):
        check(state, changed(config, train__precision="fp32"))


# ------------------------------------------------------------------------------ world size
def test_another_world_size_is_refused(config):
    with pytest.raises(CheckpointError) as info:
        check(saved_state(config, world_size=2), config)
    assert str(info.value) == (
        "checkpoint step_000000010 was written by 2 process(es) but this run has 1; resume "
        "with the same count (torchrun --nproc_per_node=2), re-sharding on resume is not "
        "supported"
    )


def test_world_size_defaults_to_one_and_is_checked_before_the_config(config):
    state = saved_state(config)
    del state["world_size"]
    with pytest.raises(CheckpointError, match="written by 1 process"):
        check(state, changed(config, seed=9), world_size=4)


def test_sharded_and_single_process_checkpoints_do_not_mix(config):
    with pytest.raises(CheckpointError, match="holds sharded \\(torchrun\\) state"):
        check(saved_state(config, sharded=True), config)
    with pytest.raises(CheckpointError, match="written by a single-process run"):
        check(saved_state(config, world_size=2), config, world_size=2, distributed=True)
    check(saved_state(config, world_size=2, sharded=True), config, world_size=2,
          distributed=True)


# ----------------------------------------------------------------------- vocab and data
def test_another_vocabulary_is_a_data_error(config):
    with pytest.raises(DataError, match="embedding has 512 rows but the shards in .* use a "
                                        "vocabulary of 1024"):
        check(saved_state(config), config, model_vocab=1024)


def test_another_tokenizer_is_a_data_error(config):
    identity = {**IDENTITY, "tokenizer_sha256": "c" * 64}
    with pytest.raises(DataError, match=f"tokenizer {'a' * 12} but .* holds tokenizer "
                                        f"{'c' * 12}: the data was re-prepared"):
        check(saved_state(config), config, identity=identity)


def test_a_checkpoint_without_a_tokenizer_checksum_is_not_compared(config):
    state = saved_state(config)
    del state["tokenizer_sha256"]
    check(state, config, identity={**IDENTITY, "tokenizer_sha256": "c" * 64})


def test_moved_data_with_the_same_shards_resumes(config, capsys):
    moved = changed(config, data__dir="/new/place/data")
    check(saved_state(config), moved)
    assert "the prepared data moved (data.dir: " in capsys.readouterr().out


def test_moved_data_with_other_shards_is_refused(config):
    moved = changed(config, data__dir="/new/place/data")
    identity = {**IDENTITY, "data_sha256": "e" * 64}
    with pytest.raises(CheckpointError, match="changes results \\(data.dir: checkpoint has"):
        check(saved_state(config), moved, identity=identity)


def test_data_re_prepared_in_place_is_refused(config):
    identity = {**IDENTITY, "data_sha256": "e" * 64}
    with pytest.raises(CheckpointError, match=r"data_sha256: checkpoint has \w{12}…, the shards"):
        check(saved_state(config), config, identity=identity)
    check(saved_state(config), config, identity=identity, allow_config_change=True)  # warned


def test_moved_data_of_a_checkpoint_without_data_checksum_says_how_to_go_on(config):
    state = saved_state(config)
    del state["data_sha256"]
    moved = changed(config, data__dir="/new/place/data")
    with pytest.raises(CheckpointError, match="predates data checksums: if the new directory is "
                                              "a byte-identical copy, pass --allow-config-"):
        check(state, moved)
    check(state, moved, allow_config_change=True)


# ------------------------------------------------------------------------ single problems
def test_single_checks_return_none_when_compatible():
    assert compat.world_size_problem("s", 2, 2) is None
    assert compat.vocab_problem(10, 10, "d") is None
    assert compat.tokenizer_problem(None, "x", "d") is None
    assert compat.tokenizer_problem("x", "x", "d") is None
    assert compat.sharding_problem(PATH, {}, False) is None
    assert config_differences({"seed": 1}, {"seed": 1}) == []
