"""Load, override and validate the run configuration, once, at start-up.

The YAML file is read with configue (so its `()` syntax picks the loss class, as in the original project), command-line
`--set key.path=value` overrides are applied, and every value is checked against the schema (schema.py): unknown keys,
wrong types and out-of-range values each raise `ConfigError` with one sentence naming the key and the fix. The result
is a tree of frozen dataclasses that the rest of the program only reads.

A key that a file does not set keeps the original project's meaning where it had one (its teacher, data, prompt,
untrained truncated 6-layer student, 60/20/20 split, SGD at 0.001 without schedule or clipping, batches of 2 random
samples up to 1024 tokens, 10 epochs, float32 throughout), so the original's own config file (`configs/seed.yaml`)
runs its experiment on any machine; `config.yaml` sets its better choices explicitly.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from pathlib import Path
from typing import Any

import yaml

from distillation.base import storage
from distillation.base.errors import first_line
from distillation.settings import config_guard, schema
from distillation.settings.config_guard import LOSS_SECTION
from distillation.settings.schema import DEFAULT_LOSS, Config, ConfigError, TrainingParameters
from distillation.settings.values import check_value


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read `path` with configue, apply `key.path=value` overrides, validate, and return the frozen Config."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass a YAML file with --config.")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file with --config.")
    raw = _read_with_configue(path)
    if raw is None:  # an empty file, or only comments: most likely a truncated or unsaved one
        raise ConfigError(
            f"config file {path} is empty; write its settings (config.yaml shows every section) or "
            f"pass another file with --config."
        )
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path} holds a {type(raw).__name__}, not a mapping of sections; write its settings as "
            f"sections (paths:, training_parameters:, ...) at the top level."
        )
    tree = _to_plain_tree(raw)
    overridden = [_apply_override(tree, override) for override in overrides]
    if (*LOSS_SECTION, "()") in overridden:
        _keep_arguments_the_class_takes(tree, {keys[-1] for keys in overridden if keys[:-1] == LOSS_SECTION})
    tree.setdefault("name", path.stem)
    config = _build(Config, tree, str(path), "")
    schema.check(config, str(path))
    return config


def to_plain_dict(config: Config) -> dict:
    """The resolved config as plain YAML-ready values, the loss back in configue's `()` form."""
    training = config.training_parameters
    plain = dataclasses.asdict(
        dataclasses.replace(config, training_parameters=dataclasses.replace(training, loss=None))
    )
    plain["training_parameters"]["loss"] = training.loss.spec()
    return plain


def dump_config(config: Config, path: Path) -> None:
    storage.atomic_write_text(path, yaml.safe_dump(to_plain_dict(config), sort_keys=False))


def _read_with_configue(path: Path) -> Any:
    import configue
    from configue.exceptions import ConfigueError, SubPathNotFound

    try:
        config_guard.check_file(path)  # before configue runs anything the file names
        return configue.load(str(path))
    except config_guard.ConfigFileError as error:
        raise ConfigError(str(error)) from None
    except yaml.YAMLError as error:  # what only constructing finds, e.g. a !cfg that refers to itself
        raise ConfigError(
            f"{path} cannot be read{config_guard.yaml_error_place(error)}; fix the value there."
        ) from None
    except (SubPathNotFound, KeyError, IndexError) as error:  # a !cfg path through a value an !import reads
        raise ConfigError(
            f"{path}: a `!cfg` path goes through an imported value and leads to no value ({first_line(error)}); "
            f"fix the path."
        ) from None
    except ConfigueError as error:
        raise ConfigError(
            f"{path}: {first_line(error)}; the `()` entry must name an existing class such as "
            f"loss.DistillationLoss or loss.ClassicLoss."
        ) from None
    except (TypeError, ValueError) as error:
        # Raised by a class constructor that configue called, e.g. the loss with a misspelt or invalid argument.
        raise ConfigError(
            f"{path}: training_parameters.loss: {_argument_problem(error)}; fix it under training_parameters.loss."
        ) from None


def _argument_problem(error: Exception) -> str:
    """A criterion's TypeError or ValueError in plain words: "...got an unexpected keyword argument 'alpah'" names
    the argument."""
    text = str(error)
    if "unexpected keyword argument" in text:
        return f"unknown argument {text.rsplit(' ', 1)[-1]}"
    return text


def _is_criterion(value: Any) -> bool:
    """Whether `value` is a criterion that configue built (recognised by its `spec`, without importing loss.py)."""
    return callable(getattr(value, "spec", None))


def _to_plain_tree(value: Any) -> Any:
    """Turn the configue result into plain dicts and lists; the criterion that configue built stays as it is."""
    if isinstance(value, dict):
        return {key: _to_plain_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_plain_tree(item) for item in value]
    return value


def _apply_override(tree: dict, override: str) -> tuple:
    """Set the value of one `key.path=value` in `tree`; returns the key path."""
    key_path, separator, text = override.partition("=")
    if not separator or not key_path:
        raise ConfigError(f"--set {override!r} must look like key.path=value, e.g. training_parameters.batch_size=8.")
    keys = key_path.split(".")
    _check_override_path(keys, key_path)
    node = tree
    for depth, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:  # a loss the file leaves out is the default one, whose arguments may change
            child = node[key] = dict(DEFAULT_LOSS) if tuple(keys[: depth + 1]) == LOSS_SECTION else {}
        if _is_criterion(child):  # one of its arguments changes: it is built again from its `()` form
            child = node[key] = child.spec()
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key_path}: {key} is a single value, not a section.")
        node = child
    try:
        if text:
            config_guard.check_keys_once(text, tuple(keys), f"--set {key_path}")
        node[keys[-1]] = yaml.safe_load(text) if text else None
    except config_guard.ConfigFileError as error:
        raise ConfigError(str(error)) from None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or first_line(error)
        raise ConfigError(
            f"--set {key_path}: the value {text!r} is not valid YAML ({problem}); quote a text, e.g. "
            f"{key_path}='\"{text}\"', or fix the value."
        ) from None
    return tuple(keys)


def _keep_arguments_the_class_takes(tree: dict, overridden: set[str]) -> None:
    """`--set training_parameters.loss.()=...` names another class for the file's loss: the file's arguments
    that class does not take (alpha for loss.ClassicLoss) go, so that it is the criterion that the whole section
    `{'()': ...}` gives; an argument set with --set stays, and is checked as written."""
    section = tree["training_parameters"]["loss"]
    class_path = config_guard.criterion_path(section["()"])
    if class_path is None or class_path != section["()"]:
        return  # refused when the section is built
    parameters = inspect.signature(_criterion_class(class_path)).parameters.values()
    taken = {item.name for item in parameters if item.kind not in (item.VAR_POSITIONAL, item.VAR_KEYWORD)}
    for name in [name for name in section if name != "()" and name not in taken and name not in overridden]:
        del section[name]


def _check_override_path(keys: list[str], key_path: str) -> None:
    """Refuse unknown keys in --set, before they reach the tree (the loss accepts its own arguments)."""
    schema: Any = Config
    for depth, key in enumerate(keys):
        if schema is _LOSS_SECTION:
            if depth != len(keys) - 1:
                break
            return
        names = {item.name: item for item in dataclasses.fields(schema)}
        if key not in names:
            raise ConfigError(
                f"--set {key_path}: unknown key {'.'.join(keys[: depth + 1])}{_closest(key, names)}; "
                f"valid keys here are {', '.join(names)}."
            )
        schema = _field_schema(schema, names[key])
        if not dataclasses.is_dataclass(schema) and schema is not _LOSS_SECTION and depth != len(keys) - 1:
            raise ConfigError(f"--set {key_path}: {'.'.join(keys[: depth + 1])} is a single value, not a section.")
    if dataclasses.is_dataclass(schema):
        raise ConfigError(f"--set {key_path}: this is a section; set one of its keys instead.")


_LOSS_SECTION = object()


def _field_schema(owner: type, item: dataclasses.Field) -> Any:
    if owner is TrainingParameters and item.name == "loss":
        return _LOSS_SECTION
    return typing.get_type_hints(owner)[item.name]


def _build(schema: type, values: Any, source: str, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(
            f"{source}: {prefix.rstrip('.') or 'the top level'} must be a section of keys, not {values!r}."
        )
    known = {item.name: item for item in dataclasses.fields(schema)}
    for key in values:
        if key not in known:
            hint = _closest(str(key), known)
            raise ConfigError(f"{source}: unknown key {prefix}{key}{hint}; valid keys here are {', '.join(known)}.")
    kwargs = {}
    for name, item in known.items():
        key = f"{prefix}{name}"
        kind = _field_schema(schema, item)
        if kind is _LOSS_SECTION:
            if name in values:
                kwargs[name] = _criterion(values[name], source, key)
        elif dataclasses.is_dataclass(kind):
            # A section the file leaves out is built too, so that training_parameters gets its default loss.
            kwargs[name] = _build(kind, values.get(name) if values.get(name) is not None else {}, source, f"{key}.")
        elif name in values:
            kwargs[name] = check_value(values[name], kind, item.metadata, source, key)
    if schema is TrainingParameters and "loss" not in kwargs:
        kwargs["loss"] = _criterion(dict(DEFAULT_LOSS), source, f"{prefix}loss")
    return schema(**kwargs)


def _closest(key: str, known: dict) -> str:
    import difflib

    match = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {match[0]}?)" if match else ""


def _criterion(section: Any, source: str, key: str) -> Any:
    """The criterion of the loss section: the one configue built from the file, or one built from its `()` form
    (an override, the default) the way configue builds it, by importing the class it names, once checked."""
    if _is_criterion(section):
        return section
    if section is None:  # `loss:` written empty, as a section left empty gets its defaults
        section = dict(DEFAULT_LOSS)
    if not isinstance(section, dict) or "()" not in section:
        raise ConfigError(
            f"{source}: {key}: the section needs a `()` entry naming the loss class, e.g. `(): loss.DistillationLoss` "
            f"with alpha, beta and temperature, or `(): loss.ClassicLoss`."
        )
    arguments = dict(section)
    named = arguments.pop("()")
    problem = config_guard.naming_problem(named)
    if problem is not None:
        raise ConfigError(f"{source}: {key}: {problem}.")
    try:
        return _criterion_class(named)(**arguments)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: {key}: {_argument_problem(error)}; fix it under {key}.") from None


def _criterion_class(class_path: str) -> type:
    """The class of a criterion path of config_guard.CRITERIA, imported as configue imports it."""
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)
