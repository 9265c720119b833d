"""The README's configuration reference names every key a run or prepare config takes."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from cptrain.config import RunConfig
from cptrain.data.prepare import PrepareConfig

README = Path(__file__).resolve().parents[1] / "README.md"
LISTS = {"tasks", "seed"}  # lists of entries, documented with their entry keys in one row


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        args = typing.get_args(field.annotation) or (field.annotation,)
        sections = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if sections and name not in LISTS:
            out += leaf_keys(sections[0], f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def reference() -> str:
    text = README.read_text(encoding="utf-8")
    return text.split("### Configuration reference")[1].split("\n## ")[0]


def test_every_run_and_prepare_key_is_in_the_readme_reference():
    ref = reference()
    documented = set(re.findall(r"`([a-z0-9_.]+)`", ref))
    keys = leaf_keys(RunConfig) + leaf_keys(PrepareConfig)
    assert len(keys) > 60
    missing = [k for k in keys if k not in documented]
    assert not missing, f"add to README's configuration reference: {missing}"
    # the entry keys of the lists
    for entry in ("unique_tokens", "source: task", "source: self"):
        assert entry in ref, entry


def test_the_check_would_catch_a_new_key():
    class Extra(BaseModel):
        brand_new_key: int = 0

    documented = set(re.findall(r"`([a-z0-9_.]+)`", reference()))
    assert "brand_new_key" not in documented
    assert leaf_keys(Extra) == ["brand_new_key"]
