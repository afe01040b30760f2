"""What a config file may make configue run, and what it must hold to be read as written, checked before configue
reads it.

configue calls the class named by every `()` entry and imports what every `!ext` tag names while it loads a file,
so a config file is trusted input, like code. Before configue constructs anything, the file's YAML nodes (composed,
not constructed) are checked: a `()` entry only in `training_parameters.loss`, naming a criterion of loss.py; no
`!ext` tag and no `!!python/...` tag; no aliases that expand into a huge or endless tree ("billion laughs"), and no
nesting deeper than a config needs; and the files pulled in with `!import` are checked the same way.

YAML loaders (configue's too) keep the last of two equal keys in a mapping without a word, so a key or a whole
section written twice loses the first one's values: refused here, with both lines. A YAML error, an `!import` of a
file that does not exist, a `!cfg` path the file does not hold, and a `${NAME}` of an unset environment variable
(which configue reads as an empty text) are refused here too, naming the file that holds them (configue's own errors
name neither the imported file nor the fix).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from configue.configue_loader import ENV_PATTERN_REGEX

LOSS_SECTION = ("training_parameters", "loss")
# The criteria that a config may name: loss.py's Criterion subclasses (a test keeps the two the same).
CRITERIA = ("loss.DistillationLoss", "loss.ChunkedDistillationLoss", "loss.ClassicLoss")
# A real config holds a few hundred values, a few levels deep; aliases can make a small file expand into billions
# of values, and brackets nest as deep as the file is long.
MAX_VALUES = 10_000
MAX_DEPTH = 64
PYTHON_TAG = "tag:yaml.org,2002:python/"


class ConfigFileError(ValueError):
    """A config file, or a file it imports, that cannot be read as written; the message names the file and line."""


class UnsafeConfig(ConfigFileError):
    """An entry that would make configue run code other than a loss class of this project, or make the file's tree
    too large or too deep to load."""


def check_file(path: Path, keys: tuple = (), seen: frozenset = frozenset()) -> None:
    """Raise UnsafeConfig naming the first entry of `path` (or of a file it imports) that would run code, and
    ConfigFileError for a file that cannot be read as written. `keys` is where the file is imported in the whole
    config."""
    if path.resolve() in seen:
        raise UnsafeConfig(f"{path} imports itself through !import; remove the loop.")
    try:
        text = path.read_text(encoding="utf-8")
        _check_depth(text, path)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except UnicodeDecodeError:
        raise ConfigFileError(f"{path} is not UTF-8 text; save it as UTF-8.") from None
    except yaml.YAMLError as error:
        raise ConfigFileError(f"{path} is not valid YAML{yaml_error_place(error)}; fix the syntax there.") from None
    if root is not None:
        _check_size(root, path)
        _check_node(root, keys, path, seen | {path.resolve()}, root)


def yaml_error_place(error: yaml.YAMLError) -> str:
    """Where a YAML error is and what it is: " at line 3, column 5 (found unexpected end of stream)"."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(error, "problem", None) or str(error).strip().splitlines()[0]
    return f"{where} ({problem})"


def _check_depth(text: str, path: Path) -> None:
    """Refuse deep nesting from the parser's events, which come without recursion: composing the nodes recurses
    once per level, and a few thousand levels would overflow Python's stack."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise UnsafeConfig(
                    f"{path} line {event.start_mark.line + 1}: its values nest more than {MAX_DEPTH} "
                    f"levels deep; write a flatter config."
                )
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def _check_size(root: yaml.Node, path: Path) -> None:
    """Refuse aliases that make the tree endless or huge, before anything walks or constructs it whole."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            if sizes[id(node)] < 0:
                raise UnsafeConfig(
                    f"{path} line {node.start_mark.line + 1}: an alias refers to the value that "
                    f"holds it, which makes an endless tree; write the value without the alias."
                )
            return sizes[id(node)]
        sizes[id(node)] = -1  # being measured: met again below, it holds itself
        children = (
            node.value
            if isinstance(node, yaml.SequenceNode)
            else ([item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) else [])
        )
        total = 1 + sum(size(child) for child in children)
        sizes[id(node)] = min(total, MAX_VALUES + 1)  # capped, so that the sums stay small
        return sizes[id(node)]

    if size(root) > MAX_VALUES:
        raise UnsafeConfig(
            f"{path}: its aliases (*name) expand it to more than {MAX_VALUES} values, as a "
            f'"billion laughs" file does; write the values out without aliases.'
        )


def _check_node(node: yaml.Node, keys: tuple, path: Path, seen: frozenset, root: yaml.Node) -> None:
    where = f"{path} line {node.start_mark.line + 1}"
    if node.tag.startswith("!ext"):
        raise UnsafeConfig(
            f"{where}: `!ext {node.value}` would import Python code while the file loads; write the value itself."
        )
    if node.tag.startswith(PYTHON_TAG):
        raise UnsafeConfig(
            f"{where}: the tag `!!{node.tag[len('tag:yaml.org,2002:') :]}` would run Python code while the file "
            f"loads; write the value itself."
        )
    if isinstance(node, yaml.ScalarNode):
        _check_environment(node.value, where)
    if node.tag.startswith("!import") and isinstance(node, yaml.ScalarNode):
        _check_import(node, keys, path, seen, where)
    if node.tag == "!cfg" and isinstance(node, yaml.ScalarNode):
        _check_reference(node, root, path, where)
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_node(item, (*keys, str(index)), path, seen, root)
    if isinstance(node, yaml.MappingNode):
        _check_keys_once(node, keys, str(path))
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key == "()":
                _check_constructor(value_node, keys, where)
            _check_node(value_node, (*keys, key), path, seen, root)


def _check_environment(text: str, where: str) -> None:
    """configue writes the environment variable in place of `${NAME}` (`${NAME-default}`: the default when it is
    unset), and an empty text, with a mere warning, for an unset one without a default: refused here instead."""
    for match in ENV_PATTERN_REGEX.finditer(text):
        name, has_default = match.group(2, 3)
        if name not in os.environ and not has_default:
            raise ConfigFileError(
                f"{where}: {match.group(0)} names the environment variable {name}, which is not set; set it, or "
                f"write a default as ${{{name}-value}}."
            )


def with_environment(text: str) -> str:
    """`text` as configue reads it, each `${NAME}` or `${NAME-default}` replaced (once checked)."""
    return ENV_PATTERN_REGEX.sub(lambda match: os.environ.get(match.group(2), match.group(4)), text)


def _check_import(node: yaml.ScalarNode, keys: tuple, path: Path, seen: frozenset, where: str) -> None:
    """`!import other.yaml` (relative to the importing file's folder, as configue reads it), or `!import:a.b
    other.yaml` for the value at a.b in it: the file is checked as a part of this one."""
    imported = path.parent / Path(with_environment(node.value)).expanduser()
    if not imported.is_file():
        problem = "a folder, not a file" if imported.is_dir() else "not there"
        raise ConfigFileError(
            f"{where}: `!import {node.value}` names {imported.resolve()}, which is {problem}; fix the path, which "
            f"is relative to the folder of {path.name}."
        )
    check_file(imported, keys, seen)
    sub_path = node.tag[len("!import") + 1 :]
    if not sub_path:
        return
    _, missing = _follow(yaml.compose(imported.read_text(encoding="utf-8"), Loader=yaml.SafeLoader), sub_path)
    if missing is not None:
        raise ConfigFileError(
            f"{where}: `{node.tag} {node.value}` refers to {missing}, which {imported} does not hold; fix the path "
            f"after `!import:`."
        )


def _check_reference(node: yaml.ScalarNode, root: yaml.Node, path: Path, where: str) -> None:
    """`!cfg a.b` is the value at a.b of the same file: it must be there, and not lead back to itself."""
    followed = {id(node)}
    while node.tag == "!cfg" and isinstance(node, yaml.ScalarNode):
        reference = node.value
        node, missing = _follow(root, reference)
        if missing is not None:
            raise ConfigFileError(
                f"{where}: `!cfg {reference}` refers to {missing}, which {path.name} does not hold; write the "
                f"path of an existing value of this file, keys joined with dots (e.g. `!cfg training_parameters."
                f"batch_size`)."
            )
        if node is None:  # through a value an !import reads: configue follows it
            return
        if id(node) in followed:
            raise ConfigFileError(
                f"{where}: this `!cfg` leads back to itself through {path.name} line {node.start_mark.line + 1}, so "
                f"it has no value; write the value itself there."
            )
        followed.add(id(node))


def _follow(root: yaml.Node | None, dotted: str) -> tuple[yaml.Node | None, str | None]:
    """The node at the path `dotted` (keys and list indexes joined with dots, as configue reads `!cfg`) and None;
    or None and the path's first part that `root` does not hold, as "a.b"; or None twice where the path goes
    through a tagged value such as an `!import`, which is only known once it is read."""
    node, walked = root, []
    for part in [part for part in dotted.split(".") if part]:
        walked.append(part)
        if isinstance(node, yaml.ScalarNode) and node.tag.startswith("!"):
            return None, None
        if isinstance(node, yaml.MappingNode):
            node = next((value for key, value in node.value if str(key.value) == part), None)
        elif isinstance(node, yaml.SequenceNode):
            index = int(part) if part.lstrip("-").isdigit() else None
            node = node.value[index] if index is not None and -len(node.value) <= index < len(node.value) else None
        else:
            node = None
        if node is None:
            return None, ".".join(walked)
    return node, None


def check_keys_once(text: str, keys: tuple, what: str) -> None:
    """Refuse a key written twice in any mapping of the YAML `text` (a `--set` value), as in a file."""
    nodes = [(yaml.compose(text, Loader=yaml.SafeLoader), keys)]
    while nodes:
        node, node_keys = nodes.pop()
        if isinstance(node, yaml.MappingNode):
            _check_keys_once(node, node_keys, what)
            nodes += [(value, (*node_keys, key.value)) for key, value in node.value]
        elif isinstance(node, yaml.SequenceNode):
            nodes += [(item, (*node_keys, str(index))) for index, item in enumerate(node.value)]


def _check_keys_once(node: yaml.MappingNode, keys: tuple, path: str) -> None:
    """Refuse a key written twice in one mapping (a merge `<<:` may repeat keys: it is how one overrides them)."""
    first_lines: dict[tuple, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        line, identity = key_node.start_mark.line + 1, (key_node.tag, key_node.value)
        if identity in first_lines:
            dotted = ".".join(map(str, (*keys, key_node.value)))
            lines = (
                f"on line {line}" if first_lines[identity] == line else f"at lines {first_lines[identity]} and {line}"
            )
            raise ConfigFileError(
                f"{path}: {dotted} is written twice, {lines}, and YAML would keep only the second without a word; "
                f"remove one, or merge them into one."
            )
        first_lines[identity] = line


def _check_constructor(node: yaml.Node, keys: tuple, where: str) -> None:
    named = node.value if isinstance(node, yaml.ScalarNode) else "?"
    if keys != LOSS_SECTION:
        raise UnsafeConfig(
            f"{where}: {'.'.join(map(str, keys)) or 'the top level'} has a `()` entry ({named}), which would run "
            f"Python code while the file loads; only training_parameters.loss names a class. Remove the entry."
        )
    problem = naming_problem(named)
    if problem is not None:
        raise UnsafeConfig(f"{where}: training_parameters.loss: {problem}.")


def naming_problem(named) -> str | None:
    """Why the `()` entry `named` does not name a criterion as a config must (`loss.ClassicLoss`, the way configue
    imports it: a bare class name is no module configue could import), in words; None when it does."""
    path = criterion_path(named)
    if path is None:
        return (
            f"{named!r} is not a loss class of this project; use loss.DistillationLoss, "
            f"loss.ChunkedDistillationLoss or loss.ClassicLoss"
        )
    if path != named:
        return f"{named!r} names the loss class without its module; write it as {path}"
    return None


def criterion_path(named) -> str | None:
    """The criterion that a `()` entry names (`loss.DistillationLoss`, or the bare class name) as its path in
    `CRITERIA`, or None when it names none of them."""
    module_name, _, class_name = str(named).rpartition(".")
    path = f"loss.{class_name}"
    return path if module_name in ("", "loss") and path in CRITERIA else None
