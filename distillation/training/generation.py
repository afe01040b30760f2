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
        sorted_probabilities = sorted_logits.softmax(dim=-1)
        # A token is dropped when the tokens before it already reach top_p; the most likely one always stays.
        dropped = (sorted_probabilities.cumsum(dim=-1) - sorted_probabilities) >= sampling.top_p
        logits = logits.masked_fill(dropped.scatter(1, order, dropped), float("-inf"))
    return _inverse_cdf_draw(logits, generator)


def _inverse_cdf_draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row drawn from softmax(logits) with one uniform number per row: where it falls in
    the row's cumulative weights. (torch.multinomial draws one exponential number per vocabulary entry, most of a
    generated token's time at GPT-2's vocabulary on a CPU.) The cumulative sum is in float64, so that no token's
    share is lost to rounding over 50k entries; a token of weight 0 (cut by top_k or top_p) is never drawn."""
    weights = (logits - logits.amax(dim=-1, keepdim=True)).exp()
    cumulative = weights.double().cumsum(dim=-1)
    total = cumulative[:, -1:]
    uniform = torch.rand(total.shape, generator=generator, device=total.device, dtype=torch.float64)
    # Below the total, strictly: the first entry whose cumulative weight exceeds it has a weight above 0.
    point = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cumulative, point, right=True).squeeze(1)


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
    from transformers import StaticCache

    prompts = fitted_prompts(prompts, model.config, sampling.max_new_tokens)
    ids, prompt_mask = left_padded(prompts, pad_token_id, accelerator.device)
    rows, prompt_length = ids.shape
    # The whole batch's mask and cache, allocated once: each new token writes its column in place (a cache that
    # grows by concatenation copies every layer's keys and values at each token).
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(rows, sampling.max_new_tokens)], dim=1)
    cache = StaticCache(config=model.config, max_cache_len=mask.size(1))
    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    unfinished = torch.ones(rows, dtype=torch.bool, device=ids.device)
    new_tokens = []
    was_training = model.training
    model.eval()
    try:
        step_ids = ids
        with accelerator.autocast():
            for written in range(sampling.max_new_tokens):
                logits = model(
                    input_ids=step_ids,
                    attention_mask=mask[:, : prompt_length + written],
                    position_ids=positions,
                    cache=cache,
                    logits_to_keep=1,
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
