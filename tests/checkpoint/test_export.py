"""cptrain.checkpoint.export: the Hugging Face directory of a model's weights, written
atomically, readable by others, loadable by ``from_pretrained`` and knowing its EOS."""

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from cptrain import fsutil
from cptrain.checkpoint import export, local
from cptrain.distributed import DistEnv
from cptrain.errors import EnvironmentProblem
from cptrain.models.build import model_for_run

TEXT = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.\n",
    "class Point:\n    x: int\n    y: int\n",
] * 20


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from cptrain.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(TEXT, 300, out)
    return out


@pytest.fixture
def model(tokenizer_dir):
    """A run's fresh nano model whose EOS is the tokenizer's, as the trainer builds it."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return model_for_run("nano", None, len(tok), seed=0, seq_len=32,
                         separators=(tok.eos_token_id, None))


@pytest.fixture
def usual_umask():
    """The common umask, under which files are created 0644 but safetensors writes its own
    file 0600 (what ``write_model_dir`` must undo)."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def assert_hf_dir(out: Path, model: torch.nn.Module, tokenizer_dir: Path, dtype: str) -> None:
    """What every export promises: loadable weights equal to the model's, a config naming the
    class and dtype, generation defaults stopping at the tokenizer's EOS, readable files."""
    eos = AutoTokenizer.from_pretrained(tokenizer_dir).eos_token_id
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == dtype
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == eos
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert loaded.generation_config.eos_token_id == eos
    theirs = loaded.state_dict()
    for name, weight in model.state_dict().items():
        assert torch.equal(theirs[name], weight.to(theirs[name].dtype)), name
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token_id == eos
    with torch.no_grad():
        loaded(torch.tensor([tok.encode("def add")]))


def test_export_model_is_a_loadable_hugging_face_directory(
    tmp_path, model, tokenizer_dir, usual_umask
):
    out = tmp_path / "exported"
    export.export_model(model, DistEnv("none"), out, tokenizer_dir, card="# card\n")
    assert_hf_dir(out, model, tokenizer_dir, "float32")
    assert (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file()
    assert (out / export.CARD).read_text() == "# card\n"
    assert names(tmp_path) == ["exported"]  # no temporary sibling left


def test_gathered_weights_are_written_as_save_pretrained_would(
    tmp_path, model, tokenizer_dir, usual_umask
):
    """The torchrun path: rank 0 writes the full state it gathered, in that state's dtype."""
    full = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    out = tmp_path / "gathered"
    export.write_model_dir(model, out, tokenizer_dir, full=full)
    assert_hf_dir(out, model.to(torch.bfloat16), tokenizer_dir, "bfloat16")


def test_export_model_replaces_an_old_export_as_a_whole(tmp_path, model, tokenizer_dir):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "pytorch_model.bin").write_bytes(b"stale weights")
    export.export_model(model, DistEnv("none"), out, tokenizer_dir)
    assert "pytorch_model.bin" not in names(out)
    assert export.CARD not in names(out)  # no card was asked for
    assert names(tmp_path) == ["exported"]


def test_export_model_copies_the_base_models_licence(tmp_path, model, tokenizer_dir):
    base = tmp_path / "base"
    base.mkdir()
    (base / "LICENSE").write_text("base licence")
    (base / "NOTICE.txt").write_text("notice")
    (base / "config.json").write_text("{}")  # not a licence file
    (base / "LICENSE").chmod(0o600)
    out = tmp_path / "exported"
    export.export_model(model, DistEnv("none"), out, tokenizer_dir, base=str(base))
    assert (out / "LICENSE").read_text() == "base licence"
    assert stat.S_IMODE((out / "LICENSE").stat().st_mode) == 0o644
    assert (out / "NOTICE.txt").read_text() == "notice"
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_a_full_disk_during_export_keeps_the_old_export(
    tmp_path, model, tokenizer_dir, monkeypatch
):
    out = tmp_path / "exported"
    export.export_model(model, DistEnv("none"), out, tokenizer_dir, card="old card")
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def full(fd: int, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsutil, "_write", full)
    with pytest.raises(EnvironmentProblem) as info:
        export.export_model(model, DistEnv("none"), out, tokenizer_dir, card="new card")
    assert str(info.value) == (
        f"disk full while exporting {out} ({os.strerror(errno.ENOSPC)}); free space, then "
        "resume with --resume"
    )
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert names(tmp_path) == ["exported"]


# ------------------------------------------------------------------------ from a checkpoint
def _checkpoint(tmp_path: Path, model, tokenizer_dir: Path, state: dict) -> Path:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return local.save_checkpoint(tmp_path / "ck", 7, model=model, tokenizer_dir=tokenizer_dir,
                                 optimizer=opt, state=state)


def test_export_checkpoint_copies_its_model_with_a_card(
    tmp_path, model, tokenizer_dir, usual_umask
):
    base = tmp_path / "base"
    base.mkdir()
    (base / "LICENSE").write_text("base licence")
    config = tiny_run_config(tmp_path / "myrun", tmp_path / "data",
                             model={"init_from": str(base)}).model_dump(mode="json")
    path = _checkpoint(tmp_path, model, tokenizer_dir,
                       {"config": config, "trainer": {"step": 7, "task_idx": 1}})
    out = tmp_path / "exported"
    export.export_checkpoint(path, out)

    assert_hf_dir(out, model, tokenizer_dir, "float32")
    for f in (path / "model").iterdir():
        assert fsutil.sha256_file(out / f.name) == fsutil.sha256_file(f)
    card = (out / export.CARD).read_text()
    assert card.startswith("---\n") and "myrun" in card
    assert (out / "LICENSE").read_text() == "base licence"
    assert names(tmp_path) == ["base", "ck", "exported"]


def test_export_checkpoint_without_a_config_has_no_card(tmp_path, model, tokenizer_dir):
    path = _checkpoint(tmp_path, model, tokenizer_dir, {"trainer": {"step": 7}})
    out = tmp_path / "exported"
    export.export_checkpoint(path, out)
    assert export.CARD not in names(out)
    assert names(out) == names(path / "model")


def test_export_checkpoint_of_a_checkpoint_without_model_keeps_the_old_export(
    tmp_path, model, tokenizer_dir
):
    out = tmp_path / "exported"
    export.export_model(model, DistEnv("none"), out, tokenizer_dir)
    before = names(out)
    broken = tmp_path / "step_000000001"
    broken.mkdir()
    with pytest.raises(FileNotFoundError):
        export.export_checkpoint(broken, out)
    assert names(out) == before
    assert names(tmp_path) == ["exported", "step_000000001"]
