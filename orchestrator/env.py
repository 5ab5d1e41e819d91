"""Small typed readers for settings from environment variables.

Each fails loudly, naming the variable, when a value cannot be parsed: a typo in a deployment's
environment must stop the process at start, not surface as odd behaviour later.
"""

from __future__ import annotations

import os


class ConfigError(RuntimeError):
    pass


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name} must be one of {sorted(_TRUE | _FALSE)}, got {raw!r}")


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [part.strip() for part in raw.split(",") if part.strip()]


def env_choice(name: str, default: str, choices: list[str]) -> str:
    value = os.environ.get(name) or default
    if value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _env_map(name: str, default: dict, convert) -> dict:
    """`key=value,key=value`; keys not given keep their default."""
    raw = os.environ.get(name)
    if not raw:
        return dict(default)
    result = dict(default)
    for part in raw.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or not key:
            raise ConfigError(f"{name} must look like 'key=value,key=value', got {raw!r}")
        try:
            result[key.strip()] = convert(value.strip())
        except ValueError:
            raise ConfigError(f"{name}: {key.strip()!r} has a bad value {value!r}") from None
    return result


def env_map_int(name: str, default: dict[str, int]) -> dict[str, int]:
    return _env_map(name, default, int)


def env_map_float(name: str, default: dict[str, float]) -> dict[str, float]:
    return _env_map(name, default, float)
