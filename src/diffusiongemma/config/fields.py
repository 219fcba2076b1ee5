"""Reading config fields: typed lookups that name the field and the file when something is wrong."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh",)


class ConfigError(ValueError):
    """A configuration file is missing a field, has a wrong value, or contradicts itself."""


def _where(source: str | None) -> str:
    return f" in {source}" if source else ""


def _take(d: dict, name: str, kind, source: str | None, default=..., prefix: str = ""):
    """Read `d[name]` checking its type; `default=...` marks the field required."""
    label = prefix + name
    if name not in d or d[name] is None:
        if default is ...:
            raise ConfigError(f"missing required field '{label}'{_where(source)}")
        return default
    value = d[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"field '{label}'{_where(source)} must be an integer, got {value!r}")
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"field '{label}'{_where(source)} must be {want}, got {value!r}")
    return value


def _positive(value, label: str, source: str | None, allow_zero: bool = False):
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"field '{label}'{_where(source)} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return value



def _id_list(value, label: str, source: str | None) -> tuple[int, ...]:
    ids = value if isinstance(value, list) else [value]
    if not ids or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids):
        raise ConfigError(f"field '{label}'{_where(source)} must be a token id or a non-empty list of ids, got {value!r}")
    return tuple(ids)



def _read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None

