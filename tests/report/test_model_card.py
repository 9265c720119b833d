"""report/model_card.py: the model card of exported weights, written from a run's config and
the trainer's counters alone, and what it says of the base model (registry name and Hub id,
licence, dtype, the dequantization of a GGUF). The cards written by a training run and by
``cptrain export`` are tested in tests/train/test_hooks.py."""

import json

import numpy as np
from train.test_hooks import _front_matter

from cptrain.report.model_card import base_model_facts, model_card
from cptrain.train.state import TrainerState


def test_a_card_says_when_weights_are_inside_a_task_and_what_a_fresh_model_was(make_config):
    config = make_config("mid").model_dump(mode="json")
    state = TrainerState(
        step=9,
        task_idx=1,
        task_step=3,
        loss_matrix=[[5.0, 6.0, 6.5]],
        loss_before=[6.2, 6.2, 6.3],
        run_id="ab" * 16,
    ).state_dict()
    card = model_card(config, state)
    front = _front_matter(card)
    assert "base_model" not in front and "license" not in front
    assert "inside task 2 of 3 (xml)" in card and "3 steps into task 2" in card
    assert "freshly initialised `tiny` model" in card and "Reptile: off" in card
    assert "| 2 | `xml` | 1,536 | 6 | partly |" in card and "| 3 | `asyncio`" in card
    assert "not yet" in card and "6.200" in card and "5.000" in card


def test_a_quantized_gguf_base_gives_its_license_and_a_dequantization_note(tmp_path):
    import gguf
    from gguf.quants import quantize

    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_license("mit")
    rows = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("token_embd.weight", quantize(rows, q8), raw_dtype=q8)
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    facts = base_model_facts(str(path))
    assert facts["base_model"] == str(path) and facts["license"] == "mit"
    assert facts["note"].startswith("dequantized from Q8_0")
    f32 = tmp_path / "f.gguf"
    w = gguf.GGUFWriter(str(f32), "llama")
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert "note" not in base_model_facts(str(f32))


def test_a_card_names_the_hub_id_the_replay_seed_and_a_half_precision_base(make_config,
                                                                          tmp_path):
    from cptrain.models.registry import FORMAT, MANIFEST

    known = tmp_path / "smollm2"
    known.mkdir()
    (known / MANIFEST).write_text(json.dumps({"format": FORMAT, "name": "smollm2-135m"}))
    assert base_model_facts(str(known))["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    config = make_config("c", method="replay").model_dump(mode="json")
    config["model"]["init_from"] = str(half)
    config["replay"]["seed"] = [{"source": "task", "task": "xml", "tokens": 4096},
                                {"source": "self", "tokens": 2048, "temperature": 1.0,
                                 "top_p": 0.95}]
    card = model_card(config, TrainerState().state_dict())
    assert "replay seed: 4,096 tokens of `xml`" in card
    assert "replay seed: 2,048 tokens of text sampled from the starting model" in card
    assert "these weights are float32" in card and "were bfloat16" in card

