"""Continuing a released model (issue 11): ``model.init_from`` of any decoder-only causal LM
directory (Llama, Qwen2, Mistral, Gemma) or a ``.gguf`` file, FSDP2's generic layer wrapping,
the FLOPs shape of such configs, and the one-line errors for what is not a causal LM.
``cptrain models fetch`` (offline, from a GGUF that ``write_tiny_gguf`` here writes) is tested
in test_fetch.py.

Every model is tiny (2 layers, hidden 64, vocabulary 512 like the test data's tokenizer)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import model_after, tiny_run_config
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from cptrain.distributed import decoder_layers
from cptrain.errors import CheckpointError, ConfigError, EnvironmentProblem
from cptrain.models.build import count_parameters, load_pretrained
from cptrain.models.flops import ModelShape, run_shape, shape_from_hf_config
from cptrain.train import Trainer, train

VOCAB = 512
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": False},
    "qwen2": {"tie_word_embeddings": True},  # q/k/v biases, tied head
    "mistral": {"sliding_window": None},
    "gemma": {"head_dim": 32},  # wider heads than hidden/heads; tied; scaled embeddings
}
MER = {
    "method": "mer",
    "replay": {"alpha": 0.25, "visibility_lag": 1},
    "reptile": {"k": 3, "epsilon": 0.5},
    "data": {"tasks": ["email", "xml"]},
}


def tiny_config(arch: str, **extra: Any):
    return AutoConfig.for_model(arch, **{**COMMON, **ARCHS.get(arch, {}), **extra})


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, prepared_dir) -> dict[str, Path]:
    """arch -> a save_pretrained directory of its tiny random model, with the tokenizer the
    test data was prepared with (a released model directory carries its tokenizer)."""
    root = tmp_path_factory.mktemp("released")
    out = {}
    for arch in ARCHS:
        tiny_model(arch).save_pretrained(root / arch)
        for f in (prepared_dir / "tokenizer").iterdir():
            (root / arch / f.name).write_bytes(f.read_bytes())
        out[arch] = root / arch
    return out


@pytest.fixture(scope="module")
def uninterrupted(saved, prepared_dir, tmp_path_factory):
    """arch -> (config, weights the trainer started from, summary) of a finished MER run."""
    root = tmp_path_factory.mktemp("from_released")
    done: dict[str, Any] = {}

    def get(arch: str):
        if arch not in done:
            cfg = tiny_run_config(
                root / arch, prepared_dir, model={"init_from": str(saved[arch])}, **MER
            )
            trainer = Trainer(cfg, progress=False)
            start = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            done[arch] = (cfg, start, trainer.run())
        return done[arch]

    return get


def one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- loading
@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_run_starts_from_the_saved_weights_and_keeps_the_architecture(arch, saved, uninterrupted):
    cfg, start, summary = uninterrupted(arch)
    want = load_file(saved[arch] / "model.safetensors")
    for name, tensor in want.items():
        assert torch.equal(start[name], tensor), name
    loaded = load_pretrained(saved[arch])
    assert loaded.config.model_type == arch and loaded.config.num_key_value_heads == 2
    tied = bool(loaded.config.tie_word_embeddings)
    assert (loaded.lm_head.weight is loaded.get_input_embeddings().weight) == tied
    assert loaded.config._attn_implementation == "sdpa" and loaded.dtype == torch.float32
    # the run trained the model as loaded: its exports are of the same architecture
    after = json.loads((Path(cfg.run_dir) / "models" / "after_1_xml" / "config.json").read_text())
    assert after["model_type"] == arch and after.get("tie_word_embeddings", tied) == tied
    lm = np.array(summary["loss_matrix"])
    assert lm.shape == (2, 2) and np.isfinite(lm).all()
    assert summary["reptile_updates"] == summary["steps"] // 3
    assert run_shape(summary) == shape_from_hf_config(loaded.config.to_dict())
    assert summary["params"] == count_parameters(loaded)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_resume_from_released_model_is_bit_identical(arch, uninterrupted, make_config, saved):
    ref_cfg, _, ref_summary = uninterrupted(arch)
    part = make_config(
        f"part-{arch}", model={"init_from": str(saved[arch])}, checkpoint={"every": 4}, **MER
    )
    stopped = Trainer(part, progress=False, stop_after=9)  # past the step-8 checkpoint, task 2
    stopped.run()
    assert stopped.state.task_idx == 1
    del stopped
    resumed = train(part, resume=True, progress=False)
    for task in range(2):
        got, want = model_after(part.run_dir, task), model_after(ref_cfg.run_dir, task)
        assert set(got) == set(want)
        for name in want:
            assert torch.equal(got[name], want[name]), (task, name)
    assert resumed["loss_matrix"] == ref_summary["loss_matrix"]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fsdp2_finds_the_decoder_layers_of_any_architecture(arch):
    model = tiny_model(arch)
    assert decoder_layers(model) == list(model.model.layers)

    class Plain(torch.nn.Module):  # no _no_split_modules: the longest ModuleList of one type
        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])

    plain = Plain()
    assert decoder_layers(plain) == list(plain.blocks)
    with pytest.raises(ConfigError, match="cannot find the decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "arch, extra",
    [
        ("llama", {"hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 2}),
        ("mistral", {"hidden_size": 256, "num_attention_heads": 8, "num_key_value_heads": 4}),
        ("gemma", {"hidden_size": 192, "num_attention_heads": 3, "head_dim": 128}),
        ("qwen2", {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 1}),
    ],
)
def test_flops_shape_of_released_configs_counts_the_real_weights(arch, extra):
    cfg = tiny_config(arch, **extra)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shape = shape_from_hf_config(cfg.to_dict())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert shape.head_dim == head_dim and shape.attn_width == cfg.num_attention_heads * head_dim
    assert shape.tied == bool(cfg.tie_word_embeddings)
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias"))
    assert shape.total_params() == count_parameters(model) - biases  # biases: Qwen2's q/k/v
    matmul = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
    assert shape.block_matmul_params() == matmul
    # a summary of an older cptrain has no head_dim: hidden // heads
    old = {k: v for k, v in shape.__dict__.items() if k != "head_dim"}
    assert ModelShape(**old).head_dim == shape.hidden // shape.heads


# --------------------------------------------------------------------------- GGUF
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf), which transformers undoes on load."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _byte_level_vocab() -> tuple[list[str], list[str]]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens, merges = list(chars), []
    for a in chars[33:93]:
        for b in chars[33:93]:
            if len(tokens) == VOCAB - 1:
                return [*tokens, "<|endoftext|>"], merges
            tokens.append(a + b)
            merges.append(f"{a} {b}")
    raise AssertionError("unreachable")


def write_tiny_gguf(path: Path, arch: str = "llama", seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny Llama as an F32 GGUF with a byte-level BPE vocabulary; returns its HF weights."""
    import gguf

    model = tiny_model("llama", seed)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(16)
    w.add_vocab_size(VOCAB)
    tokens, merges = _byte_level_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (VOCAB - 1) + [3])
    w.add_token_merges(merges)
    w.add_bos_token_id(VOCAB - 1)
    w.add_eos_token_id(VOCAB - 1)
    names = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm",
             "lm_head.weight": "output"}  # fmt: skip
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    for layer in range(2):
        for hf_name, g_name in parts.items():
            names[f"model.layers.{layer}.{hf_name}.weight"] = f"blk.{layer}.{g_name}"
    for hf_name, g_name in names.items():
        t = sd[hf_name]
        if hf_name.endswith("q_proj.weight"):
            t = _permute(t, 4)
        elif hf_name.endswith("k_proj.weight"):
            t = _permute(t, 2)
        w.add_tensor(f"{g_name}.weight", np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dict(model.state_dict())


def test_init_from_a_gguf_file_dequantizes_it_in_memory(tmp_path, make_config):
    from transformers import AutoTokenizer

    from cptrain.config_base import build_config
    from cptrain.data.prepare import PrepareConfig, prepare
    from cptrain.errors import DataError

    path = tmp_path / "tiny.gguf"
    want = write_tiny_gguf(path)
    # data prepared with another tokenizer: refused, the vocabularies compared id by id
    with pytest.raises(DataError, match="tiny.gguf has another vocabulary than the tokenizer"):
        Trainer(make_config("other", model={"init_from": str(path)}), progress=False)
    # data prepared with the GGUF's own tokenizer
    AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name).save_pretrained(
        tmp_path / "tok")
    text = tmp_path / "text.jsonl"
    words = " ".join(f"word{i % 97} x{i % 13}" for i in range(4000))
    text.write_text("".join(json.dumps({"text": words[i:i + 2000]}) + "\n"
                            for i in range(0, len(words), 2000)))
    prepared = prepare(build_config(PrepareConfig, {
        "out_dir": str(tmp_path / "prepared"), "tokenizer": {"path": str(tmp_path / "tok")},
        "tasks": [{"name": "a", "train": [str(text)], "val": [str(text)]}]}), progress=False)
    cfg = tiny_run_config(tmp_path / "from-gguf", prepared, model={"init_from": str(path)},
                          data={"tasks": ["a"]})
    t = Trainer(cfg, progress=False)
    got = t.model.state_dict()
    assert torch.equal(
        got["model.layers.1.mlp.down_proj.weight"], want["model.layers.1.mlp.down_proj.weight"]
    )
    for name, tensor in want.items():  # every weight, q/k back in Hugging Face row order
        assert torch.equal(got[name], tensor), name
    assert t.model.config.num_key_value_heads == 2 and not t.model.config.tie_word_embeddings
    assert getattr(t.model.config, "quantization_config", None) is None
    t.model.save_pretrained(tmp_path / "saved")  # a plain model: save_pretrained works
    assert load_pretrained(tmp_path / "saved").config.model_type == "llama"


# --------------------------------------------------------------------------- bad input
def test_what_is_not_a_causal_lm_is_a_one_line_error(tmp_path, prepared_dir):
    from transformers import BertConfig, BertForMaskedLM

    bert = tmp_path / "bert"
    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    BertForMaskedLM(BertConfig(vocab_size=VOCAB, intermediate_size=64, **small)).save_pretrained(
        bert
    )
    with pytest.raises(CheckpointError) as e:
        load_pretrained(bert)
    assert "bert model (BertForMaskedLM), not a decoder-only causal LM" in one_line_error(e)

    bare = tmp_path / "bare-bert"
    BertConfig(vocab_size=VOCAB).save_pretrained(bare)  # no architectures recorded
    with pytest.raises(CheckpointError, match="bert model, not a decoder-only causal LM"):
        load_pretrained(bare)

    tokenizer_only = tmp_path / "tok"
    tokenizer_only.mkdir()
    for f in (prepared_dir / "tokenizer").iterdir():
        (tokenizer_only / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError) as e:
        load_pretrained(tokenizer_only)
    assert "holds tokenizer files but no model" in one_line_error(e)

    pickled = tmp_path / "pickled"
    tiny_config("llama").save_pretrained(pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(pickled)
    assert "no *.safetensors weights" in one_line_error(e)

    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_pretrained(tmp_path / "weights.txt")


def test_a_gguf_transformers_cannot_dequantize_is_a_one_line_error(tmp_path):
    import gguf

    path = tmp_path / "rwkv.gguf"
    w = gguf.GGUFWriter(str(path), "rwkv6")
    w.add_name("tiny-rwkv")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError) as e:
        load_pretrained(path)
    msg = one_line_error(e)
    assert "GGUF of architecture 'rwkv6', which transformers cannot dequantize" in msg
    assert "llama" in msg and "safetensors directory" in msg


def test_gguf_without_the_gguf_package_is_an_environment_problem(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(EnvironmentProblem, match="needs the gguf package"):
        load_pretrained(path)


def test_a_model_directory_without_tokenizer_is_refused_before_training(tmp_path, make_config):
    from cptrain.errors import DataError

    bare = tmp_path / "bare"
    tiny_model("llama").save_pretrained(bare)
    cfg = make_config("bare-run", model={"init_from": str(bare)})
    with pytest.raises(DataError, match="has no tokenizer.json, so nothing shows that"):
        Trainer(cfg, progress=False)
    assert not Path(cfg.run_dir).exists()


@pytest.mark.parametrize("family", ["gpt2", "opt", "bloom"])
def test_flops_of_families_without_llama_keys_count_their_real_matmuls(family):
    """GPT-2, OPT, BLOOM: other key names, two-matrix MLPs; the count is their weights'."""
    from transformers import AutoConfig as AC

    kwargs = {
        "gpt2": {"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": VOCAB},
        "opt": {"num_hidden_layers": 2, "hidden_size": 32, "ffn_dim": 80,
                "num_attention_heads": 4, "vocab_size": VOCAB, "word_embed_proj_dim": 32},
        "bloom": {"n_layer": 2, "hidden_size": 32, "n_head": 4, "vocab_size": VOCAB},
    }[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AC.for_model(family, **kwargs))
    shape = shape_from_hf_config(model.config.to_dict())
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    blocks = sum(p.numel() for n, p in model.named_parameters()
                 if p.dim() == 2 and id(p) not in embeds and "lm_head" not in n)
    assert shape.block_matmul_params() == blocks
    assert shape.layers == 2 and shape.mlp_mats == 2


def test_a_gpt2_model_trains_from_init_from(tmp_path, make_config, prepared_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB,
                               n_positions=64)).save_pretrained(d)
    for f in (prepared_dir / "tokenizer").iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = make_config("gpt2-run", model={"init_from": str(d)}, data={"tasks": ["email"]})
    summary = train(cfg, progress=False)
    assert summary["complete"] and summary["flops"]["flops_per_token"] > 0
    assert summary["model_shape"]["mlp_mats"] == 2


def test_a_refused_init_from_leaves_no_run_directory(tmp_path, make_config, prepared_dir):
    from transformers import BertConfig, BertForMaskedLM

    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(bert)
    for f in (prepared_dir / "tokenizer").iterdir():
        (bert / f.name).write_bytes(f.read_bytes())
    cfg = make_config("from-bert", model={"init_from": str(bert)})
    with pytest.raises(CheckpointError, match="not a decoder-only causal LM"):
        Trainer(cfg, progress=False)
    assert not Path(cfg.run_dir).exists()
