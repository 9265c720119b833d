"""Hooks beyond metrics.jsonl: TensorBoard events and the model cards of exported weights."""

from __future__ import annotations

import importlib.util
import json
import stat
import time
from pathlib import Path

import pytest
import yaml
from conftest import read_metrics, with_tokenizer

from cptrain.cli import main
from cptrain.data.prepare import load_prepared_tokenizer
from cptrain.errors import ConfigError
from cptrain.models.build import build_model
from cptrain.models.registry import FORMAT, MANIFEST
from cptrain.train import Trainer, train
from cptrain.train.hooks import TensorBoard, after_the_newest_event_file

TRAIN_FIELDS = ("loss", "lr", "grad_norm", "tokens_per_s", "effective_alpha", "grad_cos")


# --------------------------------------------------------------------------- TensorBoard
def _scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_mirrors_metrics_jsonl_and_a_resume_repeats_no_step(make_config):
    pytest.importorskip("tensorboard")
    cfg = make_config(
        "tb",
        method="replay",
        replay={"alpha": 0.25, "visibility_lag": 1},
        diagnostics={"every": 3},
    )
    Trainer(cfg, progress=False, stop_after=9).run()  # killed at step 9; checkpoint at 6
    first = sorted((Path(cfg.run_dir) / "tensorboard").iterdir())
    assert len(first) == 1
    assert 8 in [s for s, _ in _scalars(first[0])["train/loss"]]  # logged, then lost
    train(cfg, resume=True, progress=False)

    files = sorted((Path(cfg.run_dir) / "tensorboard").iterdir())
    assert len(files) == 2  # one event file per process
    tb = _scalars(Path(cfg.run_dir) / "tensorboard")
    records = read_metrics(cfg.run_dir, "train")
    steps = [r["step"] for r in records]
    assert [s for s, _ in tb["train/loss"]] == steps  # step 8 once, from the resumed run
    for field in TRAIN_FIELDS:
        want = [(r["step"], r[field]) for r in records if field in r]
        assert want, field
        got = tb[f"train/{field}"]
        assert [s for s, _ in got] == [s for s, _ in want], field
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), field
    assert any(k.startswith("train/buffer_") for k in tb)

    evals = [r for r in read_metrics(cfg.run_dir) if r["type"] in ("before", "task_end")]
    assert [r["step"] for r in evals] == [0, 6, 12, 18]
    for task in evals[0]["val_loss"]:
        got = tb[f"val_loss/{task}"]
        assert [s for s, _ in got] == [r["step"] for r in evals]
        assert [v for _, v in got] == pytest.approx([r["val_loss"][task] for r in evals])
    assert [v for _, v in tb["union_loss"]] == pytest.approx([r["union_loss"] for r in evals])


def test_a_new_event_file_sorts_after_one_opened_in_the_same_second(tmp_path):
    now = int(time.time())
    # what an attempt earlier in this second left, with a name that sorts after this process's
    (tmp_path / f"events.out.tfevents.{now}.host.99999.9").write_bytes(b"")
    after_the_newest_event_file(tmp_path)
    assert int(time.time()) > now
    skewed = tmp_path / "skewed"  # written by a clock an hour ahead: no point in waiting
    skewed.mkdir()
    (skewed / f"events.out.tfevents.{now + 3600}.host.1.0").write_bytes(b"")
    start = time.monotonic()
    after_the_newest_event_file(skewed)
    after_the_newest_event_file(tmp_path / "nothing-yet")
    assert time.monotonic() - start < 0.5


def test_tensorboard_can_be_switched_off(make_config):
    cfg = make_config("no-tb", logging={"tensorboard": False}, data={"tasks": ["email"]})
    train(cfg, progress=False)
    assert not (Path(cfg.run_dir) / "tensorboard").exists()


def _without_tensorboard(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "tensorboard" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_tensorboard_true_without_the_package_is_a_one_line_config_error(
    make_config, monkeypatch, capsys
):
    _without_tensorboard(monkeypatch)
    assert not TensorBoard("auto").enabled  # auto: quietly off
    with pytest.raises(ConfigError, match="pip install tensorboard") as err:
        Trainer(make_config("tb-missing", logging={"tensorboard": True}), progress=False)
    assert "\n" not in str(err.value)


def test_tensorboard_switch_is_run_control_a_resume_may_change(make_config):
    from cptrain.config import config_differences

    a = make_config("a").model_dump(mode="json")
    b = make_config("a", logging={"tensorboard": False}).model_dump(mode="json")
    assert a["logging"] != b["logging"] and config_differences(a, b) == []
    with pytest.raises(ConfigError, match="logging.tensorboard: .*auto, true or false"):
        make_config("a", logging={"tensorboard": "sometimes"})


# --------------------------------------------------------------------------- model cards
def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:].split("\n---\n", 1)[0])


@pytest.fixture(scope="module")
def released_base(prepared_dir, tmp_path_factory) -> Path:
    """A model directory as `cptrain models fetch` leaves it: weights and its MANIFEST.json."""
    out = tmp_path_factory.mktemp("base") / "tiny-release"
    build_model("tiny", len(load_prepared_tokenizer(prepared_dir)), seed=5).save_pretrained(out)
    with_tokenizer(out, prepared_dir)
    manifest = {
        "format": FORMAT,
        "name": "tiny-release",
        "model": "Tiny-Release-Instruct",
        "license": "Apache-2.0",
        "source": {"package": "llm-tiny", "version": "0.1", "quantization": "Q4_1"},
        "note": "dequantized from Q4_1: weights carry 4-bit quantization noise",
        "files": {},
    }
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / "LICENSE").write_text("Apache License 2.0 (the base model's own text)\n")
    return out


def test_task_exports_carry_a_model_card_that_cptrain_export_repeats(
    make_config, released_base, tmp_path, capsys
):
    cfg = make_config(
        "card",
        method="mer",
        model={"init_from": str(released_base)},
        replay={"alpha": 0.25, "visibility_lag": 1},
        reptile={"k": 3, "epsilon": 0.5},
        data={"eval_only": ["xml"], "tasks": ["email", "asyncio"]},
    )
    summary = train(cfg, progress=False)
    run = Path(cfg.run_dir)
    exported = sorted((run / "models").iterdir())
    assert [p.name for p in exported] == ["after_0_email", "after_1_asyncio"]  # no temp dirs
    before = summary["loss_before"]
    for i, model_dir in enumerate(exported):
        card = (model_dir / "README.md").read_text(encoding="utf-8")
        front = _front_matter(card)
        assert front["library_name"] == "transformers"
        assert front["base_model"] == "tiny-release" and front["license"] == "apache-2.0"
        assert front["tags"] == ["cptrain", "continual-pretraining"]
        assert f"after task {i + 1} of 2 ({summary['tasks'][i]})" in card
        assert "Tiny-Release-Instruct" in card
        assert "dequantized from Q4_1: weights carry 4-bit quantization noise" in card
        assert "α = 0.25" in card and "k = 3, ε = 0.5" in card
        assert "`email`" in card and "`asyncio`" in card and "`xml`" in card
        assert "| 1 | `email` | 1,536 | 6 | yes |" in card
        assert "xml forgetting (final − before)" in card  # what the base knew, kept or lost
        lines = card.splitlines()
        row = next(ln for ln in lines if ln.startswith("before "))
        assert row.split()[1:] == [f"{before[c]:.3f}" for c in ("email", "asyncio", "xml")]
        rows = [ln for ln in lines if ln.split()[:1] in (["email"], ["asyncio"])]
        assert [r.split()[1:] for r in rows] == [
            [f"{v:.3f}" for v in summary["loss_matrix"][k]] for k in range(i + 1)
        ]

    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert (tmp_path / "out" / "README.md").read_text(encoding="utf-8") == (
        exported[-1] / "README.md"
    ).read_text(encoding="utf-8")
    # the base model's licence travels with every export of weights derived from it
    for d in (*exported, tmp_path / "out"):
        assert (d / "LICENSE").read_text() == (released_base / "LICENSE").read_text()
    # Weights readable like the files beside them (safetensors alone writes 0600), on every path
    weights = [*(d / "model.safetensors" for d in exported), tmp_path / "out" / "model.safetensors",
               *run.glob("checkpoints/step_*/model/model.safetensors")]
    assert len(weights) >= 4
    assert {stat.S_IMODE(w.stat().st_mode) for w in weights} == {0o644}


# --------------------------------------------------------------------------- throughput
def test_eta_adds_the_evaluations_checkpoints_and_exports_to_come(monkeypatch):
    from types import SimpleNamespace

    from cptrain.train import hooks

    now = [100.0]
    monkeypatch.setattr(hooks.time, "perf_counter", lambda: now[0])
    clock = hooks.Throughput()  # started at t=100 (on_run_start needs a whole trainer)
    trainer = SimpleNamespace(
        state=SimpleNamespace(step=0),
        plan=SimpleNamespace(total_steps=12, task_steps=[6, 6], seq_len=32, n_fresh=8),
        cfg=SimpleNamespace(
            eval=SimpleNamespace(every=4),
            checkpoint=SimpleNamespace(every=0),
            train=SimpleNamespace(log_every=2),
        ),
        at_task_end=False,
        env=SimpleNamespace(world_size=1),
    )
    assert clock.eta(trainer) is None  # nothing measured yet
    with clock.timed("eval"):  # the "before" evaluation
        now[0] += 3.0
    record: dict = {}
    for step in (1, 2):
        with clock.timed("step"):
            now[0] += 1.0
        trainer.state.step = step
        record = {"replay_rows": 0}
        clock.on_step_end(trainer, record)
    # 1 s a step for 10 more; evaluations at 4 and 8 and both task ends, 3 s each
    assert clock.eta(trainer) == pytest.approx(10 * 1.0 + 4 * 3.0)
    assert record["tokens_per_s"] == pytest.approx(2 * 8 * 32 / 2.0)
    assert record["wall_tokens_per_s"] == pytest.approx(2 * 8 * 32 / 5.0)
    assert (record["eval_s"], record["checkpoint_s"], record["export_s"]) == (3.0, 0.0, 0.0)
    assert "mfu" not in record  # no measured peak: no MFU
    state = clock.state_dict()
    again = hooks.Throughput()
    again.load_state_dict(state)
    assert again.totals == clock.totals and again.counts == clock.counts
    again.load_state_dict({"version": 99})  # unreadable timings restart nothing else
    assert again.totals == clock.totals
    # a checkpoint from before exports were timed keeps its other totals
    older = {**state, "seconds": dict(state["seconds"]), "counts": dict(state["counts"])}
    del older["seconds"]["export"], older["counts"]["export"]
    fresh = hooks.Throughput()
    fresh.load_state_dict(older)
    assert fresh.totals == clock.totals and fresh.totals["eval"] == 3.0
    with clock.timed("export"):  # the weights after a task
        now[0] += 2.0
    # the export leaves the per-step mean and comes back once per task end still to come
    assert clock.eta(trainer) == pytest.approx(10 * 1.0 + 4 * 3.0 + 2 * 2.0)


def test_exports_carry_eos_architectures_dtype_and_generation_defaults(make_config, tmp_path):
    """Every export path: the documents' EOS (so generate() stops), the class to load, the
    weights' dtype and generation_config.json, also where the weights were gathered from
    shards (``full``, written without save_pretrained)."""
    from cptrain.checkpoint.export import write_model_dir
    from cptrain.models.build import load_pretrained

    cfg = make_config("ids", data={"tasks": ["email"]})
    trainer = Trainer(cfg, progress=False)
    trainer.run()
    eos, bos = trainer.data.separators
    assert eos is not None
    gathered = tmp_path / "gathered"
    full = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.model.config.architectures = None  # as on a sharded run, which never saved itself
    write_model_dir(trainer.model, gathered, trainer.data.tokenizer_dir, full)
    for out in (Path(cfg.run_dir) / "models" / "after_0_email", gathered):
        config = json.loads((out / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
        assert (config["eos_token_id"], config["bos_token_id"]) == (eos, bos)
        # the context it was trained for, not a preset's 2048
        assert config["max_position_embeddings"] == cfg.train.seq_len
        generation = json.loads((out / "generation_config.json").read_text())
        assert generation["eos_token_id"] == eos
        assert load_pretrained(out).generation_config.eos_token_id == eos
