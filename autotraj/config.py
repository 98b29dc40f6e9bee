"""Configs: dataclasses filled from defaults < YAML file < dotted `key=value` overrides.

`load_config(SynthesizeConfig, "configs/x.yaml", ["rollout.temperature=0.7"])` returns a
frozen dataclass; unknown keys and values of the wrong type raise `ConfigError` naming the file
and the dotted field. `to_dict` gives the resolved config to save beside a stage's outputs.

A file may start from another: a top-level `extends: other.yaml` (a path relative to the file)
reads that file first and merges this one over it, mappings key by key, any other value
replaced whole (a list included). Chains are followed; a cycle is an error.

`load_stage_config` reads a single-stage command's config from its section of a pipeline
config (configs/cpu.yaml, configs/paper.yaml) or from a file of the stage's own fields.

Not here: the stage configs themselves (each stage module defines its own `<Stage>Config`).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the source and the field."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-6` as a float (PyYAML's YAML 1.1 rules need a dot, `1.0e-6`,
    and would hand the learning rate `1e-6` over as the string '1e-6'), and that rejects a key
    given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys are reported by the base class
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line (PyYAML's own message spans several, with a caret drawing)."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def to_dict(config: Any) -> Any:
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (tuple, list)):
        return [to_dict(x) for x in config]
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def _coerce(value: Any, hint: Any, where: str, base: Any = None) -> Any:
    """`value` checked against `hint`; `base` is what a nested section given as a mapping updates."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where, base)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {hint}"
        )
    if origin is Literal:
        if value not in get_args(hint):
            hint_yaml = ""
            if isinstance(value, bool):  # YAML 1.1 reads no/yes/off/on as booleans
                hint_yaml = " (YAML reads yes/no/on/off as true/false: quote the value, 'no')"
            raise ConfigError(f"{where}: must be one of {get_args(hint)}, got {value!r}{hint_yaml}")
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return _build(hint, value, where, base if isinstance(base, hint) else None)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        args = get_args(hint)
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported config type {hint}")


def build(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and type.

    A nested section given as a mapping updates that field's default rather than the nested
    class's own defaults (`field(default_factory=lambda: RolloutConfig(temperature=0.0))` keeps
    temperature 0.0 when the file sets only `rollout.max_new_tokens`).
    """
    return _build(cls, data, where, None)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _build(cls: type, data: dict[str, Any], where: str, base: Any) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for k, v in data.items():
        start = None
        if isinstance(v, dict):
            start = getattr(base, k) if base is not None else _field_default(fields[k])
        kwargs[k] = _coerce(v, hints[k], f"{where}.{k}" if where else k, start)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{k}' is not a section")
    node[keys[-1]] = value


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into `base`: mappings key by key, anything else replaced.

    >>> merge({"a": {"x": 1, "y": 2}, "b": [1]}, {"a": {"y": 3}, "b": [2]})
    {'a': {'x': 1, 'y': 3}, 'b': [2]}
    """
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_file(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of a config file, with its `extends:` chain merged under it."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `extends` goes round in a cycle")
    try:
        loaded = _parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(e)}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    data = loaded or {}
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: extends: must be a file path, got {parent!r}")
    base = read_yaml_file(path.parent / parent, (*seen, path.resolve()))
    return merge(base, data)


def load_config(
    cls: type, path: str | Path | None = None, overrides: typing.Sequence[str] = ()
) -> Any:
    """Defaults < YAML file (after the files it extends) < `key=value` overrides, as a checked
    `cls` instance."""
    if path is None:
        return _load(cls, {}, "overrides" if overrides else "defaults", overrides)
    return _load(cls, read_yaml_file(Path(path)), str(path), overrides)


def load_stage_config(
    cls: type, stage: str, path: str | Path | None = None, overrides: typing.Sequence[str] = ()
) -> Any:
    """A single-stage command's config (`autotraj sft --config configs/cpu.yaml`).

    A pipeline config (a file with a `stages` key or a `<stage>` section, which no stage config
    has as a field) gives its `<stage>` section (defaults if it has none) with the file's
    top-level `run_dir`: exactly the config `autotraj run` gives that stage (pipeline.py's
    `stage_config`: a section's own run_dir, if set, must be the top-level one). Any other file
    is the stage's own config, as `load_config` reads it. Overrides name the stage's fields
    either way (`epochs=2`, `run_dir=runs/x`).
    """
    if path is None:
        return load_config(cls, None, overrides)
    data = read_yaml_file(Path(path))
    names = {f.name for f in dataclasses.fields(cls)}
    if stage in names or not (stage in data or "stages" in data):
        return load_config(cls, path, overrides)
    section = data.get(stage) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: section '{stage}' must be a mapping")
    if "run_dir" in names:
        default = cls().run_dir
        top = data.get("run_dir", default)
        if section.get("run_dir", top) not in (top, default):
            raise ConfigError(
                f"{path}: {stage}.run_dir is {section['run_dir']!r}: in a pipeline set run_dir "
                f"once at the top level"
            )
        section = {**section, "run_dir": top}
    return _load(cls, section, f"{path} (section '{stage}')", overrides)


def _load(cls: type, data: dict[str, Any], source: str, overrides: typing.Sequence[str]) -> Any:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        try:
            value = _parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(
                f"override '{item}': invalid YAML value: {_yaml_problem(e)}"
            ) from None
        _set_dotted(data, key.strip(), value)
    try:
        return build(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
