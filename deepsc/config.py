"""params.yaml: loading, profiles, dotted overrides and flattening for MLflow.

params.yaml holds the `default` profile in its top-level sections; `profile: NAME` deep-merges
`profiles.NAME` over them. Stage functions receive the merged mapping (or a typed view of one
section) and never read the file themselves.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping

from deepsc.errors import ConfigError

DEFAULT_PARAMS = Path("params.yaml")


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Return `base` with `override` merged in, recursively for nested mappings."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# Sections whose keys are names the user chooses (a profile may add an ablation variant).
OPEN_SECTIONS = ("ablation.variants",)
# Chosen with --profile / DEEPSC_PROFILE / the file's `profile`, never by an override.
NOT_OVERRIDABLE = ("profile", "profiles")


def check_value(key: str, old: Any, new: Any) -> None:
    """Refuse a new value of another kind than the setting's: a section stays a section, a
    number a number (int and float mix), a flag a flag, text text, a list a list. A setting
    that is null (unset) takes any value, and null replaces any value but a section."""
    def kind(value: Any) -> str:
        if value is None:
            return "null"
        if isinstance(value, Mapping):
            return "a section"
        if isinstance(value, bool):
            return "true/false"
        if isinstance(value, (int, float)):
            return "a number"
        if isinstance(value, str):
            return "text"
        if isinstance(value, (list, tuple)):
            return "a list"
        return type(value).__name__

    if old is None or (new is None and not isinstance(old, Mapping)):
        return
    if kind(old) != kind(new):
        now = "" if isinstance(old, Mapping) else f" ({old!r})"
        raise ConfigError(f"setting '{key}' is {kind(old)}{now}, got {kind(new)}: {new!r}")


def set_dotted(params: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set `a.b.c` = value in a nested dict, refusing keys that do not exist (typos) and values
    of another kind (:func:`check_value`)."""
    node = params
    parts = dotted_key.split(".")
    if parts[0] in NOT_OVERRIDABLE:
        raise ConfigError(f"'{dotted_key}' cannot be overridden: choose a profile with --profile or DEEPSC_PROFILE")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"unknown setting '{dotted_key}': '{part}' is not a section")
        node = node[part]
    if parts[-1] not in node:
        raise ConfigError(f"unknown setting '{dotted_key}'")
    check_value(dotted_key, node[parts[-1]], value)
    node[parts[-1]] = value


def apply_overrides(params: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Copy of `params` with dotted-key overrides applied, e.g. {"loss.lambda_ta": 0.0}."""
    result = copy.deepcopy(dict(params))
    for key, value in overrides.items():
        set_dotted(result, key, value)
    return result


def check_profile(base: Mapping[str, Any], profile: Any, name: str, prefix: str = "") -> None:
    """Refuse a profile that is not a mapping, names a setting the defaults lack (a typo), or
    changes a setting's kind (:func:`check_value`); keys under :data:`OPEN_SECTIONS` are free."""
    if not isinstance(profile, Mapping):
        raise ConfigError(f"profile '{name}': {prefix.rstrip('.') or 'the profile'} must map settings to values, "
                          f"got {type(profile).__name__}")
    for key, value in profile.items():
        dotted = f"{prefix}{key}"
        if prefix.rstrip(".") in OPEN_SECTIONS:
            continue
        if key not in base:
            raise ConfigError(f"profile '{name}' sets '{dotted}', which is no setting of params.yaml (a typo?)")
        check_value(dotted, base[key], value)
        if isinstance(value, Mapping) and isinstance(base[key], Mapping):
            check_profile(base[key], value, name, f"{dotted}.")


def load_params(path: str | os.PathLike = DEFAULT_PARAMS, profile: str | None = None) -> dict[str, Any]:
    """Load params.yaml and resolve its profile (argument > DEEPSC_PROFILE > file's `profile`)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"settings file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    profiles = raw.pop("profiles", {}) or {}
    name = profile or os.environ.get("DEEPSC_PROFILE") or raw.get("profile", "default")
    if not isinstance(profiles, Mapping):
        raise ConfigError(f"{path}: 'profiles' must map profile names to settings")
    if name != "default":
        if name not in profiles:
            raise ConfigError(f"unknown profile '{name}' (known: default, {', '.join(sorted(profiles))})")
        check_profile(raw, profiles[name] or {}, name)
        raw = deep_merge(raw, profiles[name] or {})
    raw["profile"] = name
    return raw


def section(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    """One section of the settings, with a clear error when it is missing."""
    if name not in params or not isinstance(params[name], Mapping):
        raise ConfigError(f"params.yaml has no '{name}' section")
    return dict(params[name])


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested settings to dotted keys with string values (for MLflow params)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = str(value)
    return flat


def outputs_dir(params: Mapping[str, Any]) -> Path:
    """Root folder of stage outputs (never inside the DVC-tracked data folder)."""
    return Path(params.get("paths", {}).get("outputs", "outputs"))


def dump_resolved(params: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write already-resolved settings so that `load_params(path)` returns them unchanged.

    The profile's overrides are merged in already, so the file names the profile but maps it to
    an empty override (used to hand one exact set of settings to KFP components and runs).
    """
    import yaml

    resolved = {key: value for key, value in params.items() if key != "profiles"}
    name = resolved.get("profile", "default")
    if name != "default":
        resolved["profiles"] = {name: {}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(resolved, sort_keys=False))
    return path
