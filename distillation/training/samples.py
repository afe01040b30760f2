"""samples.jsonl: greedy continuations of a few fixed validation prompts at each validation, from the student (and
once, at the first validation, from the teacher), beside their reference responses; also sent to the trackers as
text. Reading them step by step shows what the numbers in metrics.jsonl mean for the text the student writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

import models
from distillation.base import storage
from distillation.run import records

# Enough tokens to read the start of an answer, few enough that a validation costs no more than a few forward passes.
MAX_NEW_TOKENS = 48
FILE_NAME = "samples.jsonl"


class Prompt(NamedTuple):
    ids: list[int]
    text: str
    reference: str


def validation_prompts(split, tokenizer, count: int) -> list[Prompt]:
    """The first `count` samples of the validation split (fixed by the seed for the whole run), each cut where its
    response starts. `prompt_length` gives that boundary for an Alpaca sample whatever `mask_instruction` says; a
    conversation is cut where its first assistant turn starts; a sample with no known boundary (a plain text, or a
    conversation whose every token is a target) is cut in the middle, so that the model continues a text whose end
    is the reference."""
    prompts = []
    for row in split.select(range(min(count, len(split)))):
        ids = list(row["input_ids"])
        boundary = _response_start(row) or max(1, len(ids) // 2)
        response = ids[boundary:]
        if response and response[-1] == tokenizer.eos_token_id:
            response = response[:-1]
        prompts.append(Prompt(ids[:boundary], tokenizer.decode(ids[:boundary]), tokenizer.decode(response)))
    return prompts


def _response_start(row: dict) -> int:
    """Where the response starts, or 0 where the sample does not say."""
    target_mask = row.get("target_mask")  # chat data (chat_data.py): its prompt_length counts every non-target
    if target_mask is None:
        return row["prompt_length"]
    return (
        next((position for position, target in enumerate(target_mask) if target and position > 0), 0)
        if not all(target_mask)
        else 0
    )


@torch.no_grad()
def greedy_continuation(
    model, prompt_ids: list[int], eos_token_id: int, accelerator, max_new_tokens: int = MAX_NEW_TOKENS
) -> list[int]:
    """The most likely next token, again and again, each time from the whole text so far (no key-value cache: a
    few dozen short forward passes, and nothing kept between them), cut at EOS. With several processes each one
    runs every step, since a sharded model's forward pass needs them all."""
    limit = models.max_positions(model.config)
    ids = torch.tensor([prompt_ids], device=accelerator.device)
    for _ in range(max_new_tokens):
        window = ids[:, -limit:] if limit else ids
        with accelerator.autocast():  # as the validation figures are computed
            # Only the last position's logits: the head over the whole window would cost a (T, V) product per token.
            logits = model(input_ids=window, use_cache=False, logits_to_keep=1).logits
        token = logits[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        if accelerator.num_processes == 1 and token.item() == eos_token_id:
            break
    new = ids[0, len(prompt_ids) :].tolist()
    return new[: new.index(eos_token_id)] if eos_token_id in new else new


class SamplesLog:
    """samples.jsonl: one record per prompt and model at each validation, written by the main process."""

    def __init__(self, directory: Path, accelerator, tokenizer, prompts: list[Prompt]) -> None:
        self.path = directory / FILE_NAME
        self.accelerator, self.tokenizer, self.prompts = accelerator, tokenizer, prompts

    def write(self, step: int, student, teacher=None) -> None:
        """Generate from the student (and the teacher, when given: a run samples it once) and record the texts.
        Both are causal LMs in eval mode."""
        networks = {"student": student} if teacher is None else {"student": student, "teacher": teacher}
        lines, texts = [], {}
        for name, network in networks.items():
            for index, prompt in enumerate(self.prompts):
                new = greedy_continuation(network, prompt.ids, self.tokenizer.eos_token_id, self.accelerator)
                record = {
                    "step": step,
                    "model": name,
                    "prompt_index": index,
                    "prompt": prompt.text,
                    "completion": self.tokenizer.decode(new),
                    "reference": prompt.reference,
                }
                lines.append(json.dumps(record) + "\n")
                texts[f"samples/{name}/{index}"] = _markdown(record)
        if not lines:
            return
        if self.accelerator.is_main_process:
            storage.append_line(self.path, "".join(lines))
        self.accelerator.log(texts, step=step)  # TensorBoard's add_text; a no-op without trackers

    def drop_after(self, step: int) -> None:
        """A resumed run replays the steps after its checkpoint, validations included: forget their samples."""
        records.rewrite_records(self.path, self.accelerator, lambda record: record.get("step", 0) <= step)


def _markdown(record: dict) -> str:
    # TensorBoard renders text as Markdown: quoted blocks keep the texts' line breaks.
    def quoted(text: str) -> str:
        return "\n".join("    " + line for line in (text or "(empty)").splitlines() or [""])

    return (
        f"**Prompt**\n\n{quoted(record['prompt'])}\n\n**{record['model'].capitalize()}**\n\n"
        f"{quoted(record['completion'])}\n\n**Reference**\n\n{quoted(record['reference'])}"
    )
