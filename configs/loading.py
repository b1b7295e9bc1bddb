"""Compose a Hydra config (a YAML entry file of this folder, its groups and command-line overrides) into a validated
dataclass instance, turning every Hydra / OmegaConf complaint into a one-line `ConfigError`.

Group options are looked up in this folder (shipped with the package) and then in `./configs` of the current
directory, if there is one: a user's own `configs/model/mine.yaml` or a planner-written `configs/parallel/plan_x.yaml`
is selected with `model=mine` or `parallel=plan_x` wherever the package is installed.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from configs import CONFIG_DIR
from configs.errors import ConfigError

KEY_HINT = "(see every key with: python -m train --cfg)"


def user_config_dir() -> Path | None:
    """`./configs` of the current directory when it holds config groups of its own (not this package's folder)."""
    folder = Path.cwd() / "configs"
    if not folder.is_dir() or folder.resolve() == CONFIG_DIR:
        return None
    return folder.resolve()


def config_groups() -> dict[str, list[str]]:
    """Every config group and its options, shipped and user-provided."""
    groups: dict[str, set[str]] = {}
    for root in (CONFIG_DIR, user_config_dir()):
        if root is None:
            continue
        for group in root.iterdir():
            options = {f.stem for f in group.glob("*.yaml")} if group.is_dir() else set()
            if options:
                groups.setdefault(group.name, set()).update(options)
    return {name: sorted(options) for name, options in sorted(groups.items())}


def _one_line(error: BaseException) -> str:
    """Reduce a Hydra / OmegaConf error (often several lines with a traceback hint) to its essential line."""
    cause = error
    while cause.__cause__ is not None and isinstance(cause, HydraException):
        cause = cause.__cause__
    if isinstance(cause, ConfigError):
        return str(cause)
    text = str(cause)
    if isinstance(cause, OmegaConfBaseException):
        full_key = getattr(cause, "full_key", None)
        message = text.splitlines()[0] if text else type(cause).__name__
        message = re.sub(r"\s+", " ", message).strip()
        if "not in" in message or "not in struct" in message:
            message += f" {KEY_HINT}"
        return f"{full_key}: {message}" if full_key else message
    lines = [line.strip() for line in text.splitlines()]
    if "Could not find" in text and "Available options" in text:
        start = next(i for i, line in enumerate(lines) if "Available options" in line) + 1
        end = next((i for i in range(start, len(lines)) if not lines[i] or lines[i].endswith(":")), len(lines))
        return f"{lines[0]}; available: {', '.join(lines[start:end])}"
    lines = [line for line in lines if line]
    return "; ".join(lines[:2]) if lines else type(error).__name__


def _reject_unknown_keys(node: Any, schema: type, path: str) -> None:
    """Hydra's `+key=value` adds keys even to structured nodes; a typed config must not accept them."""
    known = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        full_key = f"{path}.{key}" if path else str(key)
        if key not in known:
            raise ConfigError(f"{full_key}: Key '{key}' not in '{schema.__name__}' {KEY_HINT}")
        child_type = OmegaConf.get_type(node, key)
        if dataclasses.is_dataclass(child_type):
            _reject_unknown_keys(node[key], child_type, full_key)


def compose_config(overrides: list[str], config_name: str, schema: type, schema_name: str) -> Any:
    """The composed (not yet converted) DictConfig of configs/<config_name>.yaml, whose defaults list names the
    dataclass `schema` as `schema_name`; raises ConfigError with a one-line message."""
    ConfigStore.instance().store(name=schema_name, node=schema)
    user = user_config_dir()
    search = [f"hydra.searchpath=[file://{user}]"] if user is not None else []
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None, job_name="supertrain"):
            return compose(config_name=config_name, overrides=[*search, *overrides])
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise ConfigError(_one_line(error)) from None


def load_typed_config(overrides: list[str], config_name: str, schema: type, schema_name: str) -> Any:
    """Compose configs/<config_name>.yaml with overrides into a validated instance of the dataclass `schema`."""
    composed = compose_config(overrides, config_name, schema, schema_name)
    _reject_unknown_keys(composed, schema, "")
    try:
        config = OmegaConf.to_object(composed)
    except ConfigError:
        raise
    except (OmegaConfBaseException, ValueError) as error:
        raise ConfigError(_one_line(error)) from None
    assert isinstance(config, schema)
    return config
