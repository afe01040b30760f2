"""The teacher's next-token distributions, computed once and kept on disk: later epochs and later runs distil
against them without loading the teacher (`teacher.cache_top_k: K`).

For every position of every sample the cache keeps the teacher's K most likely next tokens (ids, most likely first)
with their log-probabilities, the log of the probability left to the other tokens (the "rest"), and the
log-probability of the token that actually follows (the teacher's own cross-entropy, for its perplexity). All at
temperature 1, over the student's vocabulary (a larger teacher vocabulary is cropped, as the losses do).

Layout: `<data_folder>/teacher_cache/<key>/<split>/` with `ids.npy (rows, K)` (uint16 when the vocabulary fits,
else int32), `log_probs.npy (rows, K)` float16, `rest.npy (rows,)` and `target.npy (rows,)` float16, and
`offsets.npy (samples + 1,)`: sample i owns rows offsets[i] to offsets[i + 1], one per position 0 .. length - 2 (the
positions that predict a next token), and `meta.json`: K, the vocabulary, the splits' sizes and every file's size.
The key hashes the teacher's config and every weights file (each shard), read whole (models.model_identity), its
dtype and autocast, the tokenized data (whose own key covers the data, tokenizer and max_length), K and the
vocabulary: a teacher rewritten in place builds a new cache. A finished cache is renamed into place, so an
interrupted build never looks valid, and one damaged later (a file missing, truncated, or not matching the data) is
built again, with a warning (base/verified_cache.py). The arrays are memory-mapped, never loaded whole.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dataset
import models
from distillation.base import verified_cache
from distillation.data.batching import PaddingCollator
from loss import CachedTeacher

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
MANIFEST = "meta.json"
# The rest of the probability mass is stored as a log in float16: floored where it stops mattering (e^-60).
LOWEST_LOG_PROB = -60.0


@dataclass(frozen=True)
class CachedSplit:
    """One split's cached teacher distributions (memory-mapped)."""

    ids: np.ndarray  # (rows, K)
    log_probs: np.ndarray  # (rows, K) float16
    rest: np.ndarray  # (rows,) float16
    target: np.ndarray  # (rows,) float16
    offsets: np.ndarray  # (samples + 1,)

    @property
    def top_k(self) -> int:
        return self.ids.shape[1]

    @classmethod
    def open(cls, directory: Path) -> CachedSplit:
        arrays = {
            name: np.load(directory / f"{name}.npy", mmap_mode="r")
            for name in ("ids", "log_probs", "rest", "target", "offsets")
        }
        return cls(**arrays)


def cache_directory(
    root: Path,
    teacher_name: str,
    teacher_dtype: torch.dtype,
    mixed_precision: str,
    splits,
    top_k: int,
    vocab_size: int,
) -> Path:
    """The cache's entry for what decides its contents: the teacher's files (read whole), the precision it runs in
    (its dtype, and the autocast of `mixed_precision`), the tokenized data, K and the vocabulary."""
    description = {
        "version": CACHE_FORMAT_VERSION,
        "teacher": models.model_identity(teacher_name),
        "dtype": str(teacher_dtype),
        "mixed_precision": mixed_precision,
        "data": {name: [dataset.tokenized_data_identity(split), len(split)] for name, split in splits.items()},
        "top_k": top_k,
        "vocab_size": vocab_size,
    }
    return verified_cache.location(root, description)


def load(directory: Path, splits, top_k: int, vocab_size: int) -> dict[str, CachedSplit] | None:
    """The cached distributions of `splits` (name -> tokenized split); None when there are none, or when they are
    damaged (a file missing, truncated or not what was written): a damaged cache is removed, to be built again, with
    a warning."""

    def open_splits(directory: Path, meta: dict) -> dict[str, CachedSplit]:
        cached = {name: CachedSplit.open(directory / name) for name in splits}
        problem = _damage(meta, cached, splits, top_k, vocab_size)
        if problem is not None:
            raise verified_cache.Damaged(problem)
        return cached

    return verified_cache.read(directory, MANIFEST, "teacher cache", open_splits)


def _damage(meta, cached: dict[str, CachedSplit], splits, top_k: int, vocab_size: int) -> str | None:
    """What does not match the splits the cache was built from; None when all does. The offsets follow from the
    samples' lengths, and every array has one row per position they count."""
    expected = {
        "top_k": top_k,
        "vocab_size": vocab_size,
        "splits": {name: len(split) for name, split in splits.items()},
    }
    if not isinstance(meta, dict) or any(meta.get(key) != value for key, value in expected.items()):
        return "meta.json does not describe these splits"
    for name, split in splits.items():
        arrays = cached[name]
        lengths = np.asarray(split["length"], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(np.maximum(lengths - 1, 0))])
        rows = int(offsets[-1])
        shapes = {"ids": (rows, top_k), "log_probs": (rows, top_k), "rest": (rows,), "target": (rows,)}
        if not np.array_equal(arrays.offsets, offsets):
            return f"{name}/offsets.npy does not follow the samples' lengths"
        for array_name, shape in shapes.items():
            if getattr(arrays, array_name).shape != shape:
                return f"{name}/{array_name}.npy has shape {getattr(arrays, array_name).shape}, not {shape}"
    return None


@torch.no_grad()
def build(
    directory: Path,
    teacher,
    splits,
    top_k: int,
    vocab_size: int,
    pad_token_id: int,
    batch_size: int,
    device: torch.device,
    autocast=None,
) -> dict[str, CachedSplit]:
    """Run the teacher once over every split and write its top-k distributions (see the module docstring)."""
    started = time.time()

    def fill(staging: Path) -> dict:
        for name, split in splits.items():
            _build_split(staging / name, teacher, split, top_k, vocab_size, pad_token_id, batch_size, device, autocast)
        return {
            "top_k": top_k,
            "vocab_size": vocab_size,
            "splits": {name: len(split) for name, split in splits.items()},
            "seconds": round(time.time() - started, 2),
        }

    verified_cache.write(directory, MANIFEST, fill)  # when another process finished the same cache first, theirs stays
    logger.info("Cached the teacher's top-%d distributions in %s (%.1f s)", top_k, directory, time.time() - started)
    return load(directory, splits, top_k, vocab_size)


def _build_split(
    directory: Path,
    teacher,
    split,
    top_k: int,
    vocab_size: int,
    pad_token_id: int,
    batch_size: int,
    device: torch.device,
    autocast,
) -> None:
    directory.mkdir(parents=True)
    lengths = np.asarray(split["length"], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.maximum(lengths - 1, 0))])
    rows = int(offsets[-1])
    id_dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    arrays = {
        "ids": np.lib.format.open_memmap(directory / "ids.npy", "w+", id_dtype, (rows, top_k)),
        "log_probs": np.lib.format.open_memmap(directory / "log_probs.npy", "w+", np.float16, (rows, top_k)),
        "rest": np.lib.format.open_memmap(directory / "rest.npy", "w+", np.float16, (rows,)),
        "target": np.lib.format.open_memmap(directory / "target.npy", "w+", np.float16, (rows,)),
    }
    np.save(directory / "offsets.npy", offsets)
    # Samples in length order, so that batches carry little padding.
    order = np.argsort(lengths, kind="stable")
    all_ids = split["input_ids"]  # one read of the column: row-by-row access is slow
    collate = PaddingCollator(pad_token_id)  # padded as training pads them; every position is read here
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        batch = collate([{"input_ids": all_ids[int(index)], "prompt_length": 0} for index in indices])
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
            logits = teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        top = top_k_distribution(logits[:, :-1, :vocab_size], input_ids[:, 1:], top_k)
        for row, index in enumerate(indices):
            positions = slice(int(offsets[index]), int(offsets[index + 1]))
            count = positions.stop - positions.start
            for name, values in zip(("ids", "log_probs", "rest", "target"), top):
                arrays[name][positions] = values[row, :count].cpu().numpy().astype(arrays[name].dtype)
    for array in arrays.values():
        array.flush()


def top_k_distribution(logits: torch.Tensor, next_ids: torch.Tensor, top_k: int):
    """`logits (B, T, V)` and the ids that follow `(B, T)` -> the K most likely ids `(B, T, K)` (most likely
    first), their log-probabilities `(B, T, K)`, the log of the rest of the mass `(B, T)` and the log-probability
    of the next id `(B, T)`, at temperature 1."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    top_log_probs, top_ids = log_probs.topk(top_k, dim=-1)
    rest = log_probs.scatter(-1, top_ids, float("-inf")).logsumexp(dim=-1).clamp(min=LOWEST_LOG_PROB)
    target = log_probs.gather(-1, next_ids[..., None]).squeeze(-1).clamp(min=LOWEST_LOG_PROB)
    return top_ids, top_log_probs.clamp(min=LOWEST_LOG_PROB), rest, target


class CachedTeacherCollator:
    """A collator that adds each sample's cached teacher distributions to its batch, aligned with the logits:
    `teacher_top_ids (B, T, K)`, `teacher_top_log_probs (B, T, K)`, `teacher_rest_log_prob (B, T)` and
    `teacher_target_log_prob (B, T)`; position t holds the teacher's distribution of the token at t + 1 (the last
    position, and padding, hold nothing that a loss reads)."""

    def __init__(self, collator, cached: CachedSplit) -> None:
        self.collator = collator
        self.cached = cached

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.collator(samples)
        length = batch["input_ids"].size(1)
        top_k = self.cached.top_k
        ids = torch.zeros((len(samples), length, top_k), dtype=torch.long)
        log_probs = torch.zeros((len(samples), length, top_k), dtype=torch.float32)
        rest = torch.zeros((len(samples), length), dtype=torch.float32)
        target = torch.zeros((len(samples), length), dtype=torch.float32)
        for row, sample in enumerate(samples):
            index = sample["sample_index"]
            start, stop = int(self.cached.offsets[index]), int(self.cached.offsets[index + 1])
            count = stop - start
            ids[row, :count] = torch.from_numpy(self.cached.ids[start:stop].astype(np.int64))
            log_probs[row, :count] = torch.from_numpy(self.cached.log_probs[start:stop].astype(np.float32))
            rest[row, :count] = torch.from_numpy(self.cached.rest[start:stop].astype(np.float32))
            target[row, :count] = torch.from_numpy(self.cached.target[start:stop].astype(np.float32))
        batch.update(
            teacher_top_ids=ids,
            teacher_top_log_probs=log_probs,
            teacher_rest_log_prob=rest,
            teacher_target_log_prob=target,
        )
        return batch


def from_batch(batch: dict) -> CachedTeacher:
    """The cached teacher distributions that `CachedTeacherCollator` added to a batch (on its device)."""
    return CachedTeacher(batch["teacher_top_ids"], batch["teacher_top_log_probs"], batch["teacher_rest_log_prob"])


def is_used(config) -> bool:
    """Whether the run distils against the cached distributions: `teacher.cache_top_k` and a loss with a teacher."""
    return config.teacher.cache_top_k is not None and config.training_parameters.loss.requires_teacher


def prepare(config, accelerator, tokenizer, vocab_size: int, splits, teacher_dtype: torch.dtype) -> dict | None:
    """Every split's cached teacher distributions when `is_used(config)`, built here (loading the teacher for that
    pass only) unless an earlier run left them; else None."""
    if not is_used(config):
        return None
    top_k = config.teacher.cache_top_k
    directory = cache_directory(
        Path(config.paths.data_folder) / "teacher_cache",
        config.teacher.name,
        teacher_dtype,
        accelerator.mixed_precision,
        splits,
        top_k,
        vocab_size,
    )
    splits = {name: splits[name] for name in dataset.SPLIT_NAMES}
    with accelerator.main_process_first():  # the main process builds it, the others then read it
        cached = load(directory, splits, top_k, vocab_size)
        if cached is not None:
            logger.info("Using the teacher's top-%d distributions cached in %s", top_k, directory)
            return cached
        teacher = models.load_teacher(config.teacher.name, teacher_dtype).to(accelerator.device)
        return build(
            directory,
            teacher,
            splits,
            top_k,
            vocab_size,
            tokenizer.pad_token_id,
            config.training_parameters.batch_size,
            accelerator.device,
            accelerator.autocast,
        )
