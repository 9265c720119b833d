"""The demos' settings, read from the YAML recipes of the repository's ``recipes/`` folder.

`cptrain demo` trains what ``recipes/demo.yaml`` says and `cptrain demo --released` what
``recipes/released-smollm2.yaml`` says (plus each method's overrides), on the shards their
``*-prepare.yaml`` recipes describe, so each setting lives in one place: the recipe a user
can also run by hand. Paths in the recipes assume ``data/`` (and ``models/``) under the
working directory; the demos move them under their own ``--data-dir`` and model folder.

The recipes ship inside the package: ``demo/_recipes`` links to the checkout's ``recipes/``
(what an editable install reads) and a wheel carries the files themselves (package data in
pyproject.toml); a recipe missing from either fails with a one-line error naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cptrain.config_base import read_yaml
from cptrain.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parent / "_recipes"
# where the recipes' paths put the demo corpus and the prepared shards
RECIPE_DATA_DIR = Path("data")


def read_recipe(name: str) -> dict[str, Any]:
    """The recipe ``recipes/<name>`` as a plain dict (a fresh copy on every call)."""
    path = RECIPES_DIR / name
    if not path.is_file():
        raise ConfigError(
            f"the demo's recipe {path} is missing: `cptrain demo` reads its settings from the "
            "recipes cptrain ships; reinstall cptrain (`bash scripts/setup.sh` in a checkout)"
        )
    return read_yaml(path)


def under_data_dir(path: str, data_dir: Path, *, recipe: str) -> str:
    """A recipe's ``data/…`` path, moved under ``data_dir``."""
    try:
        return str(data_dir / Path(path).relative_to(RECIPE_DATA_DIR))
    except ValueError:
        raise ConfigError(
            f"recipes/{recipe}: {path} is not under {RECIPE_DATA_DIR}/, where the demo expects "
            "its data (it moves that folder to --data-dir)"
        ) from None


def prepare_under(raw: dict[str, Any], data_dir: Path, *, recipe: str) -> dict[str, Any]:
    """A prepare recipe with its output and every task's files moved under ``data_dir``."""
    raw["out_dir"] = under_data_dir(raw["out_dir"], data_dir, recipe=recipe)
    for task in raw["tasks"]:
        for split in ("train", "val"):
            if split in task:
                task[split] = [under_data_dir(p, data_dir, recipe=recipe) for p in task[split]]
    return raw
