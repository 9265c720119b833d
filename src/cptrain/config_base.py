"""Shared machinery for YAML configs: strict pydantic models, dotted overrides, one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from cptrain.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on set."""

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False
    )


def without_unset(out: dict[str, Any], key: str) -> dict[str, Any]:
    """A model's dump without ``key`` where it is None: a key added later leaves the dump of a
    config that does not set it as it was, so configs and checkpoints written earlier compare
    equal (config_differences) and resume."""
    if out.get(key) is None:
        out.pop(key, None)
    return out


# pydantic's bound errors, in the words of the rest of cptrain's messages
_BOUNDS = {
    "greater_than": (">", "gt"),
    "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
    "too_short": ("at least", "min_length"),  # of a list
}


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    path = ".".join(
        s if (s := str(p)).isprintable() and "." not in s else repr(s) for p in first["loc"]
    )
    msg = first["msg"].removeprefix("Value error, ")  # pydantic's wording, not ours
    bound = _BOUNDS.get(first["type"])
    if bound is not None:
        op, ctx_key = bound
        got = first.get("input")
        limit = first.get("ctx", {}).get(ctx_key)
        msg = (f"must list at least {limit} item(s) (got {len(got)})" if op == "at least"
               else f"must be {op} {limit} (got {got!r})")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check spelling; see the recipes/ examples for valid keys)"
    extra = f" ({len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    where = f"{path}: " if path else ""  # a check across sections names its keys itself
    return f"{source}: {where}{msg}{extra}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML so numbers, bools and lists work."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key; use dotted paths like train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_path(data: dict[str, Any], path: list[str], value: Any, *, where: str) -> None:
    """``data[path[0]]…[path[-1]] = value``, creating missing sections; ``where`` names the
    setting in the error when a part of the path is not a section."""
    node: Any = data
    for part in path[:-1]:
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {part} is not a section")
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: {'.'.join(path[:-1])} is not a section")
    node[path[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        set_path(data, path, value, where=f"--set {item!r}")
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass the path to a YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def build_config(model_cls: type[M], data: Any, source: str = "config") -> M:
    """Validate a plain dict against ``model_cls``; any failure becomes a one-line ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values")
    try:
        return model_cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_config(model_cls: type[M], path: Path | None, overrides: list[str] | None = None) -> M:
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    return build_config(model_cls, data, source=str(path) if path else "config")
