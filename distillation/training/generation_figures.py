"""The generation figures of a split: the student's greedy answers to the split's first
`training_parameters.generation_prompts` prompts, scored against the reference responses (ROUGE-L F1, the figure
MiniLLM and DistiLLM report), by the teacher (its mean negative log-likelihood per answer token: what the teacher
thinks of what the student writes), by their length and by the share of them that ends in EOS. Perplexity on the
reference answers cannot tell apart students that write differently; these figures read what they write.

Each process answers its share of the prompts; every process generates as often (one with fewer prompts repeats a
prompt with weight 0), since a sharded model's forward pass needs them all. The sums are reduced over processes
before they are divided.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from distillation.data import batching
from distillation.runtime import hardware
from distillation.training import evaluation, generation

FIGURE_NAMES = ("rouge_l", "teacher_nll", "response_length", "eos_share", "generation_prompts")


class PromptReference(NamedTuple):
    prompt: list[int]
    reference: list[int]  # the reference response, without a final EOS


def prompt_and_reference(sample: dict, eos_token_id: int) -> PromptReference:
    """A tokenized sample cut where its response starts (batching.response_start). A sample with no prompt part (a
    plain text) is cut in the middle, so that the model continues a text whose end is the reference."""
    ids = list(sample["input_ids"])
    start = batching.response_start(sample)
    if start <= 1:
        start = max(1, len(ids) // 2)
    reference = ids[start:]
    if reference and reference[-1] == eos_token_id:
        reference = reference[:-1]
    return PromptReference(ids[:start], reference)


def split_prompts(split, count: int, eos_token_id: int) -> list[PromptReference]:
    """The first `count` samples of a split (fixed by the seed for the whole run), cut into prompt and reference."""
    return [prompt_and_reference(sample, eos_token_id) for sample in split.select(range(min(count, len(split))))]


def process_share(items: list, processes: int, index: int) -> list[tuple[object, int]]:
    """(item, weight) for process `index`'s share of `items` (every `processes`-th one), padded with the first item
    at weight 0 to as many as the process with the most, so that every process generates as often."""
    mine = [(item, 1) for item in items[index::processes]]
    per_process = -(-len(items) // processes)
    return mine + [(items[0], 0)] * (per_process - len(mine))


def answer_sums(
    answers: list[list[int]], references: list[list[int]], weights: list[int], tokenizer, scorer
) -> list[float]:
    """Summed over the weighted answers (each its new tokens, up to and including its EOS when it wrote one): the
    ROUGE-L F1 of the decoded answer (without its EOS) against the decoded reference, the new tokens, the answers
    that end in EOS, and the answers."""
    eos_token_id = tokenizer.eos_token_id
    sums = [0.0, 0.0, 0.0, 0.0]
    for answer, reference, weight in zip(answers, references, weights, strict=True):
        ends = bool(answer) and answer[-1] == eos_token_id
        text = tokenizer.decode(answer[:-1] if ends else answer)
        f1 = scorer.score(tokenizer.decode(reference), text)["rougeL"].fmeasure
        for position, value in enumerate((f1, len(answer), float(ends), 1.0)):
            sums[position] += value * weight
    return sums


@torch.no_grad()
def teacher_nll_sums(
    teacher: Callable[[dict], object],
    prompts: list[list[int]],
    answers: list[list[int]],
    weights: list[int],
    collate: batching.PaddingCollator,
    vocab_size: int,
    accelerator,
) -> torch.Tensor:
    """The teacher's negative log-likelihood of the weighted answers given their prompts, over the student's
    `vocab_size` first tokens, summed over the answer tokens (EOS included), and their count: `(2,)`. `teacher(batch)`
    gives its output as the criterion reads it. A weight-0 answer is all prompt, so it has no target; the teacher
    still runs on it (a sharded teacher needs every process at each forward pass)."""
    samples = [
        {"input_ids": prompt + answer, "prompt_length": len(prompt) + (0 if weight else len(answer))}
        for prompt, answer, weight in zip(prompts, answers, weights, strict=True)
    ]
    batch = hardware.on_device(collate(samples), accelerator)
    with accelerator.autocast():
        output = teacher(batch)
        if batch["target_tokens"] == 0:
            return torch.zeros(2, device=accelerator.device)
        nll_sum = evaluation.cross_entropy_sum(output, batch["labels"], vocab_size)
    return torch.stack([nll_sum.float(), torch.tensor(float(batch["target_tokens"]), device=nll_sum.device)])


class GenerationFigures:
    """The generation figures (FIGURE_NAMES) of the validation and test splits' first
    `training_parameters.generation_prompts` prompts: the student's greedy answers of at most
    `responses.max_new_tokens` tokens, in batches of `training_parameters.batch_size` prompts. `networks`
    (networks.Networks) holds the models; without a loaded teacher (none, or its cached distributions) `teacher_nll`
    is None."""

    def __init__(self, networks, splits, tokenizer, config) -> None:
        training = config.training_parameters
        self.networks, self.tokenizer, self.batch_size = networks, tokenizer, training.batch_size
        self.count = training.generation_prompts
        self.sampling = generation.Sampling(config.responses.max_new_tokens, greedy=True)
        self.collate = batching.PaddingCollator(tokenizer.pad_token_id, mask_instruction=True)
        self.prompts = {
            name: split_prompts(splits[name], self.count, tokenizer.eos_token_id) for name in ("validation", "test")
        }
        self.scorer = None

    def figures(self, split: str) -> dict:
        """The figures of `split`'s prompts, in the student's current weights ({} when generation_prompts is 0)."""
        if self.count == 0:
            return {}
        if self.scorer is None:
            from rouge_score import rouge_scorer  # loads nltk: only for runs that score answers

            self.scorer = rouge_scorer.RougeScorer(["rougeL"])  # no stemmer: needs no nltk data
        networks = self.networks
        accelerator = networks.accelerator
        scores_teacher = networks.teacher_model is not None and not networks.cached_teacher
        share = process_share(self.prompts[split], accelerator.num_processes, accelerator.process_index)
        answer_totals = [0.0] * 4
        nll_totals = torch.zeros(2, device=accelerator.device)
        for first in range(0, len(share), self.batch_size):
            items = [item for item, _ in share[first : first + self.batch_size]]
            weights = [weight for _, weight in share[first : first + self.batch_size]]
            prompts = [item.prompt for item in items]
            answers = generation.generate(
                networks.student_model,
                prompts,
                self.sampling,
                self.tokenizer.eos_token_id,
                self.tokenizer.pad_token_id,
                accelerator,
            )
            sums = answer_sums(answers, [item.reference for item in items], weights, self.tokenizer, self.scorer)
            answer_totals = [total + value for total, value in zip(answer_totals, sums, strict=True)]
            if scores_teacher:
                prompts = generation.fitted_prompts(
                    prompts, networks.student_model.config, self.sampling.max_new_tokens
                )
                vocab_size = networks.student_model.config.vocab_size
                nll_totals += teacher_nll_sums(
                    networks.teacher_outputs, prompts, answers, weights, self.collate, vocab_size, accelerator
                )
        totals = torch.cat([torch.tensor(answer_totals, device=accelerator.device), nll_totals])
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals, reduction="sum")
        rouge, length, ends, answers_count, nll, nll_tokens = totals.tolist()
        return {
            "rouge_l": rouge / answers_count,
            "teacher_nll": nll / nll_tokens if scores_teacher else None,
            "response_length": length / answers_count,
            "eos_share": ends / answers_count,
            "generation_prompts": int(answers_count),
        }
