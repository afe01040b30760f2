"""What a config file may make configue run, checked before configue reads it.

configue calls the class named by every `()` entry and imports what every `!ext` tag names while it loads a file,
so a config file is trusted input, like code. Before configue constructs anything, the file's YAML nodes (composed,
not constructed) are checked: a `()` entry only in `training_parameters.loss`, naming a criterion of loss.py; no
`!ext` tag; and the files pulled in with `!import` are checked the same way.
"""

from __future__ import annotations

from pathlib import Path

import yaml

import loss

LOSS_SECTION = ("training_parameters", "loss")


class UnsafeConfig(ValueError):
    """An entry that would make configue run code other than a loss class of this project."""


def check_file(path: Path, keys: tuple = (), seen: frozenset = frozenset()) -> None:
    """Raise UnsafeConfig naming the first entry of `path` (or of a file it imports) that would run code. `keys` is
    where the file is imported in the whole config. YAML syntax errors are left to the loader that follows."""
    path = path.resolve()
    if path in seen:
        raise UnsafeConfig(f"{path} imports itself through !import; remove the loop.")
    with path.open(encoding="utf-8") as handle:
        root = yaml.compose(handle, Loader=yaml.SafeLoader)
    if root is not None:
        _check_node(root, keys, path, seen | {path})


def _check_node(node: yaml.Node, keys: tuple, path: Path, seen: frozenset) -> None:
    where = f"{path} line {node.start_mark.line + 1}"
    if node.tag.startswith("!ext"):
        raise UnsafeConfig(
            f"{where}: `!ext {node.value}` would import Python code while the file loads; write the value itself."
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
    if loss.criterion_class(named) is None:
        raise UnsafeConfig(
            f"{where}: training_parameters.loss names {named!r}, which is not a loss class of this project; use "
            f"loss.DistillationLoss, loss.ChunkedDistillationLoss or loss.ClassicLoss."
        )
