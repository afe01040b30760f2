"""What a config file may make configue run, checked before configue reads it.

configue calls the class named by every `()` entry and imports what every `!ext` tag names while it loads a file,
so a config file is trusted input, like code. Before configue constructs anything, the file's YAML nodes (composed,
not constructed) are checked: a `()` entry only in `training_parameters.loss`, naming a criterion of loss.py; no
`!ext` tag and no `!!python/...` tag; no aliases that expand into a huge or endless tree ("billion laughs"), and no
nesting deeper than a config needs; and the files pulled in with `!import` are checked the same way.
"""

from __future__ import annotations

from pathlib import Path

import yaml

LOSS_SECTION = ("training_parameters", "loss")
# The criteria that a config may name: loss.py's Criterion subclasses (a test keeps the two the same).
CRITERIA = ("loss.DistillationLoss", "loss.ChunkedDistillationLoss", "loss.ClassicLoss")
# A real config holds a few hundred values, a few levels deep; aliases can make a small file expand into billions
# of values, and brackets nest as deep as the file is long.
MAX_VALUES = 10_000
MAX_DEPTH = 64
PYTHON_TAG = "tag:yaml.org,2002:python/"


class UnsafeConfig(ValueError):
    """An entry that would make configue run code other than a loss class of this project, or make the file's tree
    too large or too deep to load."""


def check_file(path: Path, keys: tuple = (), seen: frozenset = frozenset()) -> None:
    """Raise UnsafeConfig naming the first entry of `path` (or of a file it imports) that would run code. `keys` is
    where the file is imported in the whole config. A YAML syntax error raises yaml.YAMLError, as the loader would."""
    path = path.resolve()
    if path in seen:
        raise UnsafeConfig(f"{path} imports itself through !import; remove the loop.")
    text = path.read_text(encoding="utf-8")
    _check_depth(text, path)
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        _check_size(root, path)
        _check_node(root, keys, path, seen | {path})


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


def _check_node(node: yaml.Node, keys: tuple, path: Path, seen: frozenset) -> None:
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
    if node.tag.startswith("!import") and isinstance(node, yaml.ScalarNode):
        imported = path.parent / Path(node.value).expanduser()
        if imported.is_file():  # a missing one is configue's to report
            check_file(imported, keys, seen)
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_node(item, (*keys, str(index)), path, seen)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key == "()":
                _check_constructor(value_node, keys, where)
            _check_node(value_node, (*keys, key), path, seen)


def _check_constructor(node: yaml.Node, keys: tuple, where: str) -> None:
    named = node.value if isinstance(node, yaml.ScalarNode) else "?"
    if keys != LOSS_SECTION:
        raise UnsafeConfig(
            f"{where}: {'.'.join(map(str, keys)) or 'the top level'} has a `()` entry ({named}), which would run "
            f"Python code while the file loads; only training_parameters.loss names a class. Remove the entry."
        )
    if criterion_path(named) is None:
        raise UnsafeConfig(
            f"{where}: training_parameters.loss names {named!r}, which is not a loss class of this project; use "
            f"loss.DistillationLoss, loss.ChunkedDistillationLoss or loss.ClassicLoss."
        )


def criterion_path(named) -> str | None:
    """The criterion that a `()` entry names (`loss.DistillationLoss`, or the bare class name) as its path in
    `CRITERIA`, or None when it names none of them."""
    module_name, _, class_name = str(named).rpartition(".")
    path = f"loss.{class_name}"
    return path if module_name in ("", "loss") and path in CRITERIA else None
