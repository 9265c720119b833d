"""cptrain.checkpoint.manager: every registered component saved and restored as one moment,
the policy (when, how many kept) and the resume point (found, checked, then pruned)."""

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import flip, tiny_run_config
from transformers import LlamaConfig, LlamaForCausalLM

from checkpoint.test_local import assert_same
from cptrain.checkpoint import local
from cptrain.checkpoint.manager import CheckpointManager, load_weights
from cptrain.distributed import DistEnv
from cptrain.errors import CheckpointError
from cptrain.models.build import build_model
from cptrain.train.state import TrainerState

VOCAB = 64


class Anchor:
    """A component with tensors and plain values (like the Reptile anchor)."""

    def __init__(self) -> None:
        self.w = torch.zeros(2, 3)
        self.count = 0
        self.loaded: list[Any] = []

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w.clone(), "count": self.count, "shape": tuple(self.w.shape)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.loaded.append(state)
        if state is None:
            raise CheckpointError("the checkpoint has no anchor; resume from another one")
        self.w, self.count = state["w"], state["count"]
        self.shape = state["shape"]


class Cursor:
    """A per-rank component: plain values only (like a replay buffer's length)."""

    def __init__(self, position: int = 0, tensor: bool = False) -> None:
        self.position = position
        self.tensor = tensor

    def state_dict(self) -> dict[str, Any]:
        if self.tensor:
            return {"position": torch.tensor(self.position)}
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


def make(root: Path, *, keep_last: int = 2, every: int = 0, seed: int = 0, preset: str = "nano"):
    model = build_model(preset, VOCAB, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    manager = CheckpointManager(
        root, DistEnv("none"), model=model, optimizer=opt, tokenizer_dir=None,
        keep_last=keep_last, every=every,
    )
    return manager, model, opt


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    ids = torch.arange(16).reshape(2, 8)
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def steps(root: Path) -> list[int]:
    return [s for s, _ in local.list_checkpoints(root)]




# ------------------------------------------------------------------------ save and restore
def test_save_and_restore_round_trip_every_component(tmp_path):
    manager, model, opt = make(tmp_path)
    train_step(model, opt)
    anchor, trainer, cursor = Anchor(), TrainerState(step=3, run_id="r1"), Cursor(7)
    anchor.w, anchor.count = torch.randn(2, 3), 4
    manager.register("anchor", anchor)
    manager.register("trainer", trainer, required=True)
    manager.register("replay", cursor, per_rank=True)
    manager.meta["config"] = {"seed": 0}
    rng = torch.get_rng_state()
    path = manager.save(3)
    assert manager.last_step == 3
    state = json.loads((path / "state.json").read_text())
    assert state["world_size"] == 1 and state["config"] == {"seed": 0}
    assert state["replay"] == {"position": 7}

    torch.manual_seed(1234)  # the restore must bring the RNG back too
    other, model2, opt2 = make(tmp_path, seed=1)
    anchor2, trainer2, cursor2 = Anchor(), TrainerState(), Cursor()
    other.register("anchor", anchor2)
    other.register("trainer", trainer2, required=True)
    other.register("replay", cursor2, per_rank=True)
    assert other.latest() == path
    other.restore(path)

    assert_same(model2.state_dict(), model.state_dict())
    assert_same(opt2.state_dict(), opt.state_dict())
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(anchor2.w, anchor.w) and anchor2.count == 4
    assert anchor2.shape == (2, 3)  # tuples come back as tuples
    assert trainer2.state_dict() == trainer.state_dict()
    assert cursor2.position == 7
    # and both go on identically
    train_step(model, opt)
    train_step(model2, opt2)
    assert_same(model2.state_dict(), model.state_dict())


def test_a_restored_model_keeps_tied_weights_tied(tmp_path):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    env = DistEnv("none")
    CheckpointManager(tmp_path, env, model=model, optimizer=opt, tokenizer_dir=None,
                      keep_last=1).save(1)
    torch.manual_seed(1)
    fresh = LlamaForCausalLM(cfg)
    manager = CheckpointManager(tmp_path, env, model=fresh, optimizer=torch.optim.SGD(
        fresh.parameters(), lr=0.1), tokenizer_dir=None, keep_last=1)
    manager.restore(manager.latest())  # save_pretrained left lm_head.weight out
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def test_a_missing_required_component_is_an_error(tmp_path):
    manager, _, _ = make(tmp_path)
    manager.save(1)  # written without any trainer state
    other, _, _ = make(tmp_path)
    other.register("trainer", TrainerState(), required=True)
    with pytest.raises(CheckpointError, match="trainer state lacks"):
        other.restore(other.latest())


def test_a_missing_optional_component_starts_fresh(tmp_path):
    manager, _, _ = make(tmp_path)
    manager.save(1)
    other, _, _ = make(tmp_path)
    anchor = Anchor()
    other.register("anchor", anchor)
    other.restore(other.latest())
    assert anchor.loaded == [] and anchor.count == 0


def test_a_per_rank_component_must_hold_no_tensors(tmp_path):
    manager, _, _ = make(tmp_path)
    manager.register("replay", Cursor(3, tensor=True), per_rank=True)
    with pytest.raises(TypeError, match="per-rank component 'replay' must hold no tensors"):
        manager.save(1)


def test_a_component_registered_twice_is_refused(tmp_path):
    manager, _, _ = make(tmp_path)
    manager.register("anchor", Anchor())
    with pytest.raises(ValueError, match="registered twice"):
        manager.register("anchor", Anchor(), per_rank=True)
    manager.meta["config"] = {}
    with pytest.raises(ValueError, match="registered twice"):
        manager.register("config", Anchor())


def test_restoring_weights_of_another_model_is_a_checkpoint_error(tmp_path):
    manager, _, _ = make(tmp_path, preset="micro")
    manager.save(1)
    other, _, _ = make(tmp_path, preset="nano")
    with pytest.raises(CheckpointError, match="saved for another model"):
        other.restore(other.latest())


def test_load_weights_names_a_missing_or_unknown_weight(tmp_path):
    model = build_model("nano", VOCAB)
    weights = dict(model.state_dict())
    missing = {k: v for k, v in weights.items() if k != "lm_head.weight"}  # not tied here
    with pytest.raises(CheckpointError, match=r"lacks lm_head\.weight \(1 missing, 0 unknown\)"):
        load_weights(model, missing, tmp_path)
    with pytest.raises(CheckpointError, match=r"has unknown extra\.weight \(0 missing, 1 unkn"):
        load_weights(model, {**weights, "extra.weight": torch.zeros(1)}, tmp_path)


# ---------------------------------------------------------------------------------- policy
def test_keep_last_is_honoured(tmp_path):
    manager, model, opt = make(tmp_path, keep_last=2)
    for step in range(1, 6):
        train_step(model, opt)
        manager.save(step)
    assert steps(tmp_path) == [4, 5]
    assert manager.last_step == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000004", "step_000000005"]


def test_should_save_every_n_steps(tmp_path):
    every3, _, _ = make(tmp_path, every=3)
    assert [s for s in range(1, 10) if every3.should_save(s)] == [3, 6, 9]
    never, _, _ = make(tmp_path, every=0)
    assert not any(never.should_save(s) for s in range(10))


# --------------------------------------------------------------------------------- finding
def test_latest_skips_damaged_checkpoints_and_says_so(tmp_path, capsys):
    manager, _, _ = make(tmp_path, keep_last=5)
    manager.save(1)
    manager.save(2)
    flip(tmp_path / "step_000000002" / "state.json")
    assert manager.latest() == tmp_path / "step_000000001"
    out = capsys.readouterr().out
    assert "skipping damaged or incomplete checkpoint step_000000002: state.json fails" in out


def test_latest_without_a_complete_checkpoint(tmp_path):
    manager, _, _ = make(tmp_path)
    with pytest.raises(CheckpointError, match="no complete checkpoint under"):
        manager.latest()
    manager.save(1)
    (tmp_path / "step_000000001" / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint under"):
        manager.latest()


def test_header_and_model_vocab(tmp_path):
    manager, _, _ = make(tmp_path)
    path = manager.save(2)
    assert CheckpointManager.header(path)["step"] == 2
    assert CheckpointManager.model_vocab(path) == VOCAB
    (path / "state.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="unknown format 'other'"):
        CheckpointManager.header(path)
    (path / "state.json").write_text("{")
    with pytest.raises(CheckpointError, match="state.json is unreadable"):
        CheckpointManager.header(path)
    (path / "model" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="model/config.json is unreadable"):
        CheckpointManager.model_vocab(path)


# ---------------------------------------------------------------------------- resume point
IDENTITY = {"tokenizer_sha256": "t" * 64, "data_sha256": "d" * 64}


def _saved_run(tmp_path: Path, config: dict[str, Any]) -> None:
    manager, _, _ = make(tmp_path / "ck", keep_last=5)
    manager.meta.update({"config": config, **IDENTITY})
    for step in (1, 2, 3):
        manager.save(step)
    (tmp_path / "ck" / ".tmp-step_000000004-99").mkdir()  # a save a kill interrupted


def test_resume_point_accepts_then_prunes(tmp_path):
    config = tiny_run_config(tmp_path / "run", tmp_path / "data").model_dump(mode="json")
    _saved_run(tmp_path, config)
    manager, _, _ = make(tmp_path / "ck", keep_last=1)
    path, state = manager.resume_point(
        config=config, model_vocab=VOCAB, identity=IDENTITY, data_dir=tmp_path / "data"
    )
    assert path == tmp_path / "ck" / "step_000000003" and state["step"] == 3
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["step_000000003"]


def test_a_refused_resume_leaves_every_checkpoint(tmp_path):
    config = tiny_run_config(tmp_path / "run", tmp_path / "data").model_dump(mode="json")
    _saved_run(tmp_path, config)
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    changed = copy.deepcopy(config)
    changed["train"]["lr"] = 1e-2
    changed["checkpoint"]["keep_last"] = 1
    manager, _, _ = make(tmp_path / "ck", keep_last=1)
    with pytest.raises(CheckpointError, match="train.lr"):
        manager.resume_point(
            config=changed, model_vocab=VOCAB, identity=IDENTITY, data_dir=tmp_path / "data"
        )
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before
