"""The transformers pieces without a training run: the settings they refuse (one line naming
the fix), the slot each rank's rows take in Accelerate's sharding, and a loader that reads
further ahead than the buffer's visibility lag."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import tiny_run_config

from cptrain.errors import ConfigError
from cptrain.integrations.hf_callbacks import ReptileCallback, zero_stage
from cptrain.integrations.hf_data import ReplayDataset, check_loader
from cptrain.integrations.transformers import _refuse_unsupported
from integrations.common import MER

GOOD = dict(dataloader_num_workers=0, ignore_data_skip=True, gradient_accumulation_steps=1)


@pytest.mark.parametrize("change, fix", [
    ({"dataloader_num_workers": 2}, "dataloader_num_workers=0"),
    ({"ignore_data_skip": False}, "ignore_data_skip=True"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=1"),
])
def test_loader_settings_the_dataset_cannot_use_are_one_line(change, fix):
    check_loader(SimpleNamespace(**GOOD), None)
    with pytest.raises(ConfigError, match=fix):
        check_loader(SimpleNamespace(**{**GOOD, **change}), None)
    dispatcher = type("DataLoaderDispatcher", (), {})()
    with pytest.raises(ConfigError, match="dispatch_batches"):
        check_loader(SimpleNamespace(**GOOD), dispatcher)


def test_reptile_refuses_deepspeed_zero():
    assert zero_stage(SimpleNamespace(hf_deepspeed_config=None, deepspeed=None)) is None
    ds = SimpleNamespace(config={"zero_optimization": {"stage": 2}})
    args = SimpleNamespace(hf_deepspeed_config=ds, deepspeed="ds.json")
    with pytest.raises(ConfigError, match="ZeRO stage 2"):
        ReptileCallback(k=3).on_train_begin(args, SimpleNamespace(global_step=0), None)


@pytest.mark.parametrize("section, fix", [
    ({"reptile": {"enabled": True, "variant": "official"}}, "variant faithful"),
    ({"regularize": {"l2_to_start": {"weight": 1.0}}}, "KLToStartMixin"),
    ({"train": {"micro_batch_size": 4}}, "micro_batch_size"),
])
def test_what_stays_with_cptrain_train_is_refused(tmp_path, prepared_dir, section, fix):
    with pytest.raises(ConfigError, match=fix):
        _refuse_unsupported(tiny_run_config(tmp_path, prepared_dir, **section))


def _dataset(tmp_path, prepared_dir, rank=0, world=1, **extra):
    from cptrain.train.data import TrainingData

    cfg = tiny_run_config(tmp_path / "run", prepared_dir, **{**MER, **extra})
    return ReplayDataset(cfg, TrainingData(cfg), rank=rank, world_size=world,
                         run_dir=tmp_path / "run", run_id="a" * 32)


def test_each_rank_fills_its_own_slot_with_its_slice(tmp_path, prepared_dir):
    one = _dataset(tmp_path / "one", prepared_dir)
    two = _dataset(tmp_path / "two", prepared_dir, rank=1, world=2)
    one.start(0)
    two.start(0)
    items = iter(two)
    assert next(items) is None  # rank 0's slot: Accelerate keeps item <rank> of each pair
    mine = next(items)["input_ids"].numpy()
    np.testing.assert_array_equal(mine, one.rows(0).fresh[3:])  # fresh rows 3-5 of 6
    one.close()
    two.close()


def test_a_loader_reading_past_the_visibility_lag_is_one_line(tmp_path, prepared_dir):
    ds = _dataset(tmp_path, prepared_dir, replay={"alpha": 0.25, "visibility_lag": 1})
    ds.start(0)
    items = iter(ds)
    next(items), next(items)  # steps 0 and 1 read, none taken
    with pytest.raises(ConfigError, match="visibility_lag=1"):
        ds.rows(2)  # needs step 0's rows in the buffer: step 0 has not been taken
    step0 = ds.pending[0].fresh
    ds.step_done(0)  # what the callback does after step 0
    rows = next(items)["input_ids"].numpy()  # step 2: 6 fresh rows, 2 replayed from step 0's
    assert rows.shape[0] == 8 and ds.added_through == 0
    assert all((step0 == r).all(axis=1).any() for r in rows[6:])
    ds.close()


def test_kl_mixin_on_a_plain_trainer(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from cptrain.integrations.transformers import KLToStartMixin

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2))
    rows = torch.randint(0, 40, (8, 9))
    data = [{"input_ids": r, "labels": r} for r in rows]

    class KLTrainer(KLToStartMixin, Trainer):
        pass

    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to="none", save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    trainer = KLTrainer(model=model, args=args, train_dataset=data, kl_weight=0.5)
    first = trainer.compute_loss(model, {"input_ids": rows[:4], "labels": rows[:4]})
    assert trainer.last_kl == 0.0  # the start model is the model: no KL yet
    plain = model(input_ids=rows[:4], labels=rows[:4]).loss
    torch.testing.assert_close(first, plain)
    trainer.train()
    trainer.compute_loss(model, {"input_ids": rows[:4], "labels": rows[:4]})
    assert trainer.kl_weight == 0.5 and trainer.last_kl > 0
