"""cptrain's local lm-eval tasks (``cptrain.evaluation.local_tasks``): the held-out documents
are the prepared val split (without a model tokenizer's framing BOS), written as lm-eval YAML
over local JSON."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from models.test_build import VAL, config, make_model_dir

from cptrain.data.prepare import load_prepared_tokenizer, open_split, prepare
from cptrain.evaluation.local_tasks import build_local_tasks, held_out_documents
from evaluation.conftest import TASK


def test_held_out_documents_are_the_val_split(prepared_dir):
    docs = held_out_documents(prepared_dir, TASK)
    val = open_split(prepared_dir, TASK, "val")
    assert len(docs) == val.num_documents
    tok = load_prepared_tokenizer(prepared_dir)
    n_tokens = sum(len(tok.encode(d, add_special_tokens=False)) + 1 for d in docs)
    assert abs(n_tokens - val.num_tokens) <= 0.01 * val.num_tokens  # stripped whitespace only


def test_local_tasks_are_lm_eval_yaml_over_local_json(prepared_dir, tmp_path):
    names = build_local_tasks(prepared_dir, tmp_path, tasks=[TASK], items=30)
    assert names == [f"cptrain_choice_{TASK}", f"cptrain_bpb_{TASK}"]
    for n in names:
        spec = yaml.safe_load((tmp_path / f"{n}.yaml").read_text())
        assert spec["dataset_path"] == "json"
        data = Path(spec["dataset_kwargs"]["data_files"]["test"])
        assert data.is_absolute() and data.is_file()
        assert "cptrain_local" in spec["tag"]
    rows = [json.loads(x) for x in (tmp_path / f"{names[0]}.jsonl").read_text().splitlines()]
    assert len(rows) == 30


def test_downstream_documents_drop_the_framing_bos_and_keep_special_text(tmp_path: Path) -> None:
    from cptrain.evaluation.downstream import held_out_documents

    model = make_model_dir(tmp_path / "model", bos="post")
    out = prepare(config(tmp_path, {"path": str(model)}), progress=False)
    assert held_out_documents(out, "en") == VAL  # "<s>" written as text stays in the text
