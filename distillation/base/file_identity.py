"""A model's identity by the contents of the files that decide its outputs, each read whole: its config.json and
every weights file that `from_pretrained` loads (the one file, or every shard that an index lists).

Another model saved under the same name, a shard rewritten in place, or a file changed anywhere (not only near its
ends) gives another identity; the same files in another folder give the same one. The teacher's cache
(teacher_cache.py) is keyed by it and a run's checkpoints record it (checkpoints.run_identity). Reading a GPT-2
teacher (500 MB) whole takes about half a second; nothing is memoised, since no cheaper sign (a size, a time) is
sure to change with the contents.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

# The weights files that from_pretrained looks for, in its order of preference; an index lists the shards.
WEIGHTS_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
BLOCK = 8 << 20


def model_files(resolve: Callable[[str], str | Path | None]) -> dict[str, Path]:
    """The files that decide a model's outputs, by name: config.json, then the first of WEIGHTS_FILES that the model
    has, with every shard of an index. `resolve(name)` is the model's file of that name, None when it has none. A
    missing file raises FileNotFoundError, an index without shards ValueError; each names the file."""
    files = {"config.json": _required(resolve, "config.json")}
    for name in WEIGHTS_FILES:
        path = resolve(name)
        if path is None:
            continue
        files[name] = Path(path)
        if name.endswith(".index.json"):
            for shard in shard_names(Path(path)):
                files[shard] = _required(resolve, shard)
        return files
    raise FileNotFoundError(f"it has no weights file ({', '.join(WEIGHTS_FILES)})")


def shard_names(index: Path) -> list[str]:
    """The shards that a weights index (`*.index.json`) lists, each once."""
    content = json.loads(index.read_text(encoding="utf-8"))
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index.name} lists no weights (no weight_map)")
    return sorted({str(shard) for shard in weight_map.values()})


def content_digest(files: dict[str, Path]) -> str:
    """A SHA-256 of every file's name and whole contents."""
    digest = hashlib.sha256()
    for name, path in sorted(files.items()):
        contents = hash_contents(hashlib.sha256(), path)
        digest.update(f"{name}\0{contents.hexdigest()}\0".encode())
    return digest.hexdigest()


def hash_contents(digest, path: Path):
    """`digest` (a hashlib object) updated with the whole contents of the file `path`, read a block at a time so
    that a file of several gigabytes never sits in memory; returns it."""
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
    return digest


def _required(resolve: Callable[[str], str | Path | None], name: str) -> Path:
    path = resolve(name)
    if path is None:
        raise FileNotFoundError(f"{name} is missing")
    return Path(path)
