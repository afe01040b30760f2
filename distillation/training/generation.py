"""Batched generation: the student's samples (on-policy distillation), the teacher's generations (sequence-level
KD) and the greedy answers that the generation figures score.

Prompts are left-padded into one batch and continued with a key-value cache, one token per forward pass, in eval
mode (no dropout) and in the run's precision (the accelerator's autocast). A row stops at its EOS; the batch stops
when every row has, or after `max_new_tokens`. With several processes each one continues its own rows, but all run
the same number of forward passes (the longest row over every process): a sharded model (FSDP) gathers its weights
from all of them at each pass. Sampling draws from a `torch.Generator` that the caller seeds, so that a run's
samples are a function of its seed and step, whatever the processes, and a resumed run draws the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import models


@dataclass(frozen=True)
class Sampling:
    """How each next token is chosen: `greedy` (the most likely), or drawn from the distribution at `temperature`,
    restricted to the `top_k` most likely tokens (None: all) and to the smallest set whose probability reaches
    `top_p` (1: all). The defaults are pure sampling, the distribution the on-policy objectives assume."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    greedy: bool = False


def left_padded(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`prompts` as one batch, padded on the left: ids `(B, P)` and attention mask `(B, P)`."""
    longest = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, longest - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
            mask[row, longest - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def fitted_prompts(prompts: list[list[int]], model_config, max_new_tokens: int) -> list[list[int]]:
    """The prompts, each cut to its last tokens where it leaves no room for `max_new_tokens` in the model's
    positions (the config checks that max_new_tokens leaves some)."""
    limit = models.max_positions(model_config)
    room = None if limit is None else limit - max_new_tokens
    return [prompt[-room:] if room and len(prompt) > room else prompt for prompt in prompts]


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row from its logits `(B, V)`: `(B,)`."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.size(-1):
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # A token is dropped when the tokens before it already reach top_p; the most likely one always stays.
        dropped = (cumulative - sorted_logits.softmax(dim=-1)) >= sampling.top_p
        logits = logits.masked_fill(dropped.scatter(1, order, dropped), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    sampling: Sampling,
    eos_token_id: int,
    pad_token_id: int,
    accelerator,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """Each prompt's continuation by `model` (a causal LM): its new tokens, up to and including its EOS when it
    wrote one. Only the first `vocab_size` tokens can be chosen (a teacher's extra rows are not the student's); the
    prompts are `fitted_prompts`. With several processes, every process must call this the same number of times
    (each with its own prompts)."""
    from transformers import DynamicCache

    prompts = fitted_prompts(prompts, model.config, sampling.max_new_tokens)
    ids, mask = left_padded(prompts, pad_token_id, accelerator.device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    unfinished = torch.ones(len(prompts), dtype=torch.bool, device=ids.device)
    new_tokens = []
    was_training = model.training
    model.eval()
    try:
        step_ids = ids
        for _ in range(sampling.max_new_tokens):
            with accelerator.autocast():
                logits = model(
                    input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1
                ).logits[:, -1]
            if vocab_size is not None:
                logits = logits[:, :vocab_size]
            token = next_tokens(logits, sampling, generator)
            token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
            new_tokens.append(token)
            unfinished &= token != eos_token_id
            if not _any_unfinished(unfinished, accelerator):
                break
            step_ids = token[:, None]
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
            positions = positions[:, -1:] + 1
    finally:
        model.train(was_training)
    return _rows(torch.stack(new_tokens, dim=1) if new_tokens else ids[:, :0], eos_token_id)


def _any_unfinished(unfinished: torch.Tensor, accelerator) -> bool:
    """Whether a row of any process is still being written (the one device sync of each generated token)."""
    count = unfinished.sum()
    if accelerator.num_processes > 1:
        count = accelerator.reduce(count, reduction="sum")
    return bool(count.item())


def _rows(new_tokens: torch.Tensor, eos_token_id: int) -> list[list[int]]:
    """Each row of `new_tokens (B, N)` up to and including its first EOS."""
    rows = []
    for row in new_tokens.tolist():
        rows.append(row[: row.index(eos_token_id) + 1] if eos_token_id in row else row)
    return rows
