"""Batches: which samples go together (length-grouped, dealt out to the processes of a distributed run) and how
they become tensors (padded to the longest of a batch, or packed into rows of `data.max_length` tokens).

The tokenized splits come from dataset.py, one sample a row with `input_ids`, `prompt_length` and `length` (and
`target_mask` for chat data); what leaves here is a DataLoader of dicts of tensors ready for the models and the
losses, plus the batch's token counts counted on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

IGNORE_INDEX = -100  # the label of a position no loss scores (PyTorch's cross_entropy default)


class LengthGroupedBatchSampler:
    """Batches of samples of similar length, so that padding to the longest of a batch wastes little.

    Training stays random: each epoch shuffles the samples (from the seed and the epoch), cuts them into groups of
    `group_batches` batches, sorts each group by length, cuts it into batches and shuffles the order of all batches.
    Without `shuffle` (evaluation) the samples are simply taken longest first.
    """

    def __init__(self, lengths, batch_size: int, seed: int, shuffle: bool = True, group_batches: int = 8) -> None:
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_size = batch_size * group_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable")
            yield from (order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size))
            return
        generator = np.random.default_rng([self.seed, self.epoch])
        order = generator.permutation(len(self.lengths))
        batches = []
        for start in range(0, len(order), self.group_size):
            group = order[start : start + self.group_size]
            group = group[np.argsort(-self.lengths[group], kind="stable")]
            batches += [group[i : i + self.batch_size].tolist() for i in range(0, len(group), self.batch_size)]
        for position in generator.permutation(len(batches)):
            yield batches[position]


class EpochBatches:
    """The batches of one epoch in a global order that depends only on the seed and the epoch, dealt out to the
    processes of a distributed run: counted from `start`, global batch k goes to process `k % num_processes`.

    The order is the same whatever the number of processes, so a run sees the same batches on one process or many,
    and a resumed epoch (`start` global batches already done) continues with the same remaining batches even with
    another number of processes; over an epoch the processes see disjoint shards that together hold every sample
    once. Training batches are length-grouped (`LengthGroupedBatchSampler`) or plainly shuffled; evaluation
    batches (`shuffle=False`) are taken longest first.
    """

    def __init__(
        self,
        lengths,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        group_by_length: bool = True,
        num_processes: int = 1,
        process_index: int = 0,
    ) -> None:
        self.grouped = LengthGroupedBatchSampler(lengths, batch_size, seed, shuffle)
        self.count, self.batch_size, self.seed = len(self.grouped.lengths), batch_size, seed
        self.shuffle, self.group_by_length = shuffle, group_by_length
        self.num_processes, self.process_index = num_processes, process_index
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    @property
    def total(self) -> int:
        """Global batches in an epoch, over all processes."""
        return -(-self.count // self.batch_size)

    def global_batches(self) -> list[list[int]]:
        if self.group_by_length or not self.shuffle:
            self.grouped.set_epoch(self.epoch)
            return list(self.grouped)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.count)
        return [order[i : i + self.batch_size].tolist() for i in range(0, self.count, self.batch_size)]

    def __len__(self) -> int:
        return max(0, -(-(self.total - self.start - self.process_index) // self.num_processes))

    def __iter__(self):
        yield from self.global_batches()[self.start + self.process_index :: self.num_processes]


class PaddingCollator:
    """Pads a list of samples to the longest one of the batch (never to a fixed length).

    Returns `input_ids (B, T)`, `attention_mask (B, T)` and `labels (B, T)`: the input ids with IGNORE_INDEX on
    padding and, with `mask_instruction`, on the prompt. Padding is found from the attention mask, never from the
    token id, because GPT-2 pads with its EOS and the EOS that ends a sample must stay a target. Also, as Python
    ints counted here on the CPU so that the training loop needs no device sync for them: `real_tokens`
    (non-padding tokens) and `target_tokens` (scored tokens, the normaliser of a gradient-accumulation step).
    """

    def __init__(self, pad_token_id: int, mask_instruction: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.mask_instruction = mask_instruction

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(sample["input_ids"]) for sample in samples)
        input_ids = torch.full((len(samples), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
        labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
        for row, sample in enumerate(samples):
            ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            labels[row, : len(ids)] = self.sample_labels(sample, ids, first=0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            **self.token_counts(samples),
        }

    def sample_labels(self, sample: dict, ids: torch.Tensor, first: int) -> torch.Tensor:
        """A sample's labels: its ids from position `first` on, and with `mask_instruction` only its targets: a chat
        sample's `target_mask` (its assistant turns), else the tokens after its `prompt_length`."""
        labels = ids.clone()
        if self.mask_instruction and "target_mask" in sample:
            labels[~torch.as_tensor(sample["target_mask"], dtype=torch.bool)] = IGNORE_INDEX
            first_target = first
        else:
            first_target = max(first, sample["prompt_length"] if self.mask_instruction else 0)
        labels[:first_target] = IGNORE_INDEX
        return labels

    def token_counts(self, samples: list[dict]) -> dict[str, int]:
        lengths = np.array([len(sample["input_ids"]) for sample in samples])
        targets = target_counts(
            lengths, np.array([sample["prompt_length"] for sample in samples]), self.mask_instruction
        )
        return {"real_tokens": int(lengths.sum()), "target_tokens": int(targets.sum())}


def target_counts(lengths: np.ndarray, prompt_lengths: np.ndarray, mask_instruction: bool) -> np.ndarray:
    """Scored tokens per sample. Position 0 is predicted by nothing, so a sample has (length - first target
    position) targets; with `mask_instruction` the first target is the first response token. (A chat sample's
    `prompt_length` counts all its tokens outside the assistant turns, position 0 included, so the same count
    holds for it.)"""
    first_target = np.maximum(1, prompt_lengths if mask_instruction else 0)
    return np.maximum(0, lengths - first_target)


class PackingCollator(PaddingCollator):
    """Packs a batch's samples into as few rows as fit `row_length` tokens (first fit, longest first).

    GPT-2 has absolute positions and full attention, so each packed sample gets positions restarting at 0 and a
    block-diagonal causal attention mask: no token sees another sample. Returns `input_ids (R, L)`, `position_ids
    (R, L)`, `attention_mask (R, 1, L, L)` (boolean, True where attending is allowed), `labels (R, L)` with
    IGNORE_INDEX on each sample's first token (nothing in its own sample predicts it), on padding and, with
    `mask_instruction`, on prompts; plus `real_tokens` and `target_tokens` as in PaddingCollator. The loss over
    real targets is the same as with one sample a row.
    """

    def __init__(self, pad_token_id: int, row_length: int, mask_instruction: bool = False) -> None:
        super().__init__(pad_token_id, mask_instruction)
        self.row_length = row_length

    def __call__(self, samples: list[dict]) -> dict:
        rows: list[list[dict]] = []
        room: list[int] = []
        for sample in sorted(samples, key=lambda item: -len(item["input_ids"])):
            size = len(sample["input_ids"])
            fitting = next((index for index, free in enumerate(room) if free >= size), None)
            if fitting is None:
                rows.append([])
                room.append(self.row_length)
                fitting = len(rows) - 1
            rows[fitting].append(sample)
            room[fitting] -= size
        longest = max(self.row_length - free for free in room)
        shape = (len(rows), longest)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        segments = torch.full(shape, -1, dtype=torch.long)  # padding is its own segment: no row is all masked
        for row, packed in enumerate(rows):
            start = 0
            for segment, sample in enumerate(packed):
                ids = torch.as_tensor(sample["input_ids"], dtype=torch.long)
                end = start + len(ids)
                input_ids[row, start:end] = ids
                position_ids[row, start:end] = torch.arange(len(ids))
                segments[row, start:end] = segment
                labels[row, start:end] = self.sample_labels(sample, ids, first=1)
                start = end
            position_ids[row, start:] = torch.arange(longest - start)
        causal = torch.tril(torch.ones(longest, longest, dtype=torch.bool))
        attention_mask = (segments[:, :, None] == segments[:, None, :]) & causal
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": attention_mask[:, None],
            "labels": labels,
            **self.token_counts(samples),
        }


def collator(pad_token_id: int, data) -> PaddingCollator:
    """The collator that the config's `data` section asks for: packing into rows of `data.max_length` tokens, or
    padding to the longest sample of a batch."""
    if data.packing:
        return PackingCollator(pad_token_id, data.max_length, data.mask_instruction)
    return PaddingCollator(pad_token_id, data.mask_instruction)


def response_start(sample: dict) -> int:
    """Where a sample's response starts: the start of its last assistant turn for a conversation (its
    `target_mask`'s last run of targets; a prompt-only one, with no target, is all prompt), else after its
    `prompt_length` tokens (the Alpaca prompt, or a prompt-only sample's whole length)."""
    target_mask = sample.get("target_mask")
    if target_mask is None:
        return sample["prompt_length"]
    targets = [position for position, target in enumerate(target_mask) if target and position > 0]
    if not targets:  # a prompt-only conversation (it ends with a user turn)
        return len(target_mask)
    start = targets[-1]
    while start > 1 and target_mask[start - 1]:
        start -= 1
    return start


class PromptsCollator:
    """A collator that adds each sample's prompt (`prompts`: its ids before `response_start`, a list per sample) to
    its batch, for steps whose responses are generated."""

    def __init__(self, collate) -> None:
        self.collate = collate

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.collate(samples)
        batch["prompts"] = [list(sample["input_ids"][: response_start(sample)]) for sample in samples]
        return batch


def data_loader(
    split,
    collate,
    batch_size: int,
    seed: int,
    shuffle: bool,
    group_by_length: bool,
    num_processes: int,
    process_index: int,
) -> DataLoader:
    """The batches of `split` for this process, in the order of `EpochBatches` (call its `set_epoch` through the
    loader's `batch_sampler` before each epoch)."""
    sampler = EpochBatches(split["length"], batch_size, seed, shuffle, group_by_length, num_processes, process_index)
    # A generator of its own: starting to iterate then draws nothing from the global RNG, whose state (dropout)
    # a checkpoint restores, so a resumed run continues exactly as an uninterrupted one.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(split, batch_sampler=sampler, collate_fn=collate, generator=generator)
