"""Figures of a model on a split: the loss terms averaged over every real target token (not over batches), the
student's perplexity and, with a teacher, how close the student is to it; and the frozen teacher's own perplexity.

Every process evaluates its shard of the split; the sums are reduced over processes before they are divided. The
figures are computed as the criterion runs in training (`Criterion.run_as`), in its precision: a fused criterion
projects the hidden states a chunk at a time here too, so that evaluating never holds `(B, T, V)` logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch

from distillation.kernels.chunked_loss import fused_cross_entropy_sum
from loss import ModelOutput, at_targets, next_token_cross_entropy, target_ids, target_mask

# (batch on the device, weight): weight 0 marks a stand-in batch that only keeps the processes in step.
WeightedBatches = Iterable[tuple[dict, int]]


def perplexity(cross_entropy: float) -> float:
    # Capped so that an untrained model's loss gives a large number rather than an overflow.
    return math.exp(min(cross_entropy, 50.0))


def padded_batches(loader, stand_in: dict, num_processes: int, place: Callable[[dict], dict]) -> Iterator:
    """(batch, weight) for this process's evaluation batches (weight 1), then stand-in batches (weight 0) until
    every process has run as many: a sharded model's forward pass gathers its weights from all processes, so they
    must all take part in each one. `place` puts a batch on the device."""
    count = 0
    for batch in loader:
        count += 1
        yield place(batch), 1
    batches_per_process = -(-loader.batch_sampler.total // num_processes)
    for _ in range(batches_per_process - count):
        yield place(stand_in), 0


class Evaluator:
    """A run's figures on its splits: the student's, as training computes its loss, and the frozen teacher's, once
    per split. `networks` (networks.Networks) calls the models; `batches` (steps.StepBatches) gives each split;
    `generation` (generation_figures.GenerationFigures), when given, adds the figures of the student's answers."""

    def __init__(self, networks, batches, generation=None) -> None:
        self.networks, self.batches, self.generation = networks, batches, generation
        self.teacher_results: dict[str, dict] = {}

    def student(self, split: str) -> dict:
        """The student's figures (see `evaluate`) and its generation figures, if any, in eval mode."""
        networks = self.networks
        networks.student.eval()
        batches = self.batches.evaluation_batches(split)
        result = evaluate(networks.criterion, networks.forward, batches, networks.accelerator, networks.has_teacher)
        return result if self.generation is None else {**result, **self.generation.figures(split)}

    def teacher(self, split: str) -> dict:
        """The frozen teacher's figures (see `teacher_figures`), computed once per run."""
        if split not in self.teacher_results:
            networks = self.networks
            teacher = None if networks.cached_teacher else networks.teacher_outputs
            self.teacher_results[split] = teacher_figures(
                teacher,
                networks.student_model.config.vocab_size,
                self.batches.evaluation_batches(split),
                networks.accelerator,
            )
        return self.teacher_results[split]


@torch.no_grad()
def evaluate(criterion, forward, batches: WeightedBatches, accelerator, has_teacher: bool) -> dict:
    """The criterion's terms, the student's perplexity and, with a teacher, KL(teacher || student) at temperature 1
    and the share of targets where both models' most likely next token is the same. `forward(batch)` gives the
    student's and the teacher's outputs, as the criterion reads them."""
    # Summed over targets: loss, kd, ce, KL at T = 1, top-1 agreements (`Criterion.evaluation_sums`); and the targets.
    totals = torch.zeros(6, device=accelerator.device)
    for batch, weight in batches:
        student, teacher = forward(batch)
        with accelerator.autocast():  # as in training: the fused loss projects in the autocast dtype
            totals[:5] += criterion.evaluation_sums(student, teacher, batch["labels"]) * weight
        totals[5] += target_mask(batch["labels"]).sum() * weight
    totals = accelerator.reduce(totals, reduction="sum")
    loss, kd, ce, kl, agreements, _ = (totals / totals[5]).tolist()
    return {
        "loss": loss,
        "kd": kd if has_teacher else None,
        "ce": ce,
        "perplexity": perplexity(ce),
        "kl_teacher": kl if has_teacher else None,
        "top1_agreement": agreements if has_teacher else None,
        "target_tokens": int(totals[5].item()),
    }


@torch.no_grad()
def teacher_figures(
    teacher: Callable[[dict], ModelOutput] | None, vocab_size: int, batches: WeightedBatches, accelerator
) -> dict:
    """The teacher's next-token CE and perplexity, over the student's `vocab_size` first tokens: the reference a
    student's perplexity is read against. `teacher(batch)` gives the teacher's output as the criterion reads it
    (logits, or the last hidden states and the head); None reads the cached teacher's log-probability of each
    target from the batches."""
    totals = torch.zeros(2, device=accelerator.device)  # CE summed over targets; targets
    for batch, weight in batches:
        labels = batch["labels"]
        targets = target_mask(labels).sum() * weight
        if teacher is None:
            ce_sum = -at_targets(batch["teacher_target_log_prob"], labels).sum() * weight
        else:
            with accelerator.autocast():
                ce_sum = cross_entropy_sum(teacher(batch), labels, vocab_size) * weight
        totals += torch.stack([ce_sum.float(), targets.float()])
    ce_sum, count = accelerator.reduce(totals, reduction="sum").tolist()
    ce = ce_sum / max(count, 1)
    return {"ce": ce, "perplexity": perplexity(ce)}


def cross_entropy_sum(output: ModelOutput, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A model's next-token CE over its first `vocab_size` tokens, summed over the real targets of `labels (B, T)`:
    from its logits, or from its hidden states and head a chunk at a time."""
    if output.logits is not None:
        return next_token_cross_entropy(output.logits[..., :vocab_size], labels).float() * target_mask(labels).sum()
    return fused_cross_entropy_sum(at_targets(output.hidden, labels), output.head[:vocab_size], target_ids(labels))
