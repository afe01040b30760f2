"""Figures of a model on a split: the loss terms averaged over every real target token (not over batches), the
student's perplexity and, with a teacher, how close the student is to it; and the frozen teacher's own perplexity.

Every process evaluates its shard of the split; the sums are reduced over processes before they are divided.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from distillation.kernels.divergences import token_divergence
from loss import CachedTeacher, ModelOutput, at_targets, cached_teacher_buckets, next_token_cross_entropy, target_mask
from models import model_inputs

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


def logits_of(output: ModelOutput) -> torch.Tensor:
    """`(B, T, V)` logits, projected from the hidden states for a criterion that never materialises them. In
    float32, as the chunked loss projects them: under bf16 autocast the hidden states are bf16 and the student's
    head float32, and this runs outside autocast."""
    if output.logits is not None:
        return output.logits
    return output.hidden.float() @ output.head.float().T


@torch.no_grad()
def evaluate(criterion, forward, batches: WeightedBatches, accelerator, has_teacher: bool) -> dict:
    """The criterion's terms, the student's perplexity and, with a teacher, KL(teacher || student) at temperature 1
    and the share of targets where both models' most likely next token is the same. `forward(batch)` gives the
    student's and the teacher's outputs, as the criterion reads them."""
    # Summed over targets: loss, kd, ce, KL at T = 1, top-1 agreements; and the targets.
    totals = torch.zeros(6, device=accelerator.device)
    for batch, weight in batches:
        student, teacher = forward(batch)
        with accelerator.autocast():  # as in training: the fused loss projects in the autocast dtype
            output = criterion(student, teacher, batch["labels"])
        targets = target_mask(batch["labels"]).sum() * weight
        kd = output.kd if output.kd is not None else torch.zeros_like(output.ce)
        totals[:3] += torch.stack([output.loss, kd, output.ce]).float() * targets
        if isinstance(teacher, CachedTeacher):
            totals[3:5] += agreement_with_cached_teacher(logits_of(student), teacher, batch["labels"]) * weight
        elif teacher is not None:
            totals[3:5] += agreement_with_teacher(logits_of(student), logits_of(teacher), batch["labels"]) * weight
        totals[5] += targets
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
def teacher_figures(teacher, vocab_size: int, batches: WeightedBatches, accelerator) -> dict:
    """The teacher's next-token CE and perplexity, over the student's `vocab_size` first tokens: the reference a
    student's perplexity is read against. `teacher` is the causal LM, or None to read the cached teacher's
    log-probability of each target from the batches."""
    totals = torch.zeros(2, device=accelerator.device)  # CE summed over targets; targets
    for batch, weight in batches:
        targets = target_mask(batch["labels"]).sum() * weight
        if teacher is None:
            ce_sum = -at_targets(batch["teacher_target_log_prob"], batch["labels"]).sum() * weight
            totals += torch.stack([ce_sum, targets.float()])
            continue
        with accelerator.autocast():
            logits = teacher(**model_inputs(batch)).logits
        ce = next_token_cross_entropy(logits[..., :vocab_size], batch["labels"])
        totals += torch.stack([ce.float() * targets, targets.float()])
    ce_sum, count = accelerator.reduce(totals, reduction="sum").tolist()
    ce = ce_sum / max(count, 1)
    return {"ce": ce, "perplexity": perplexity(ce)}


def agreement_with_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
    """`(2,)`: summed over the real target positions, KL(teacher || student) at temperature 1 and the number of
    positions where the two models' most likely next token is the same. `student_logits (B, T, V)`,
    `teacher_logits (B, T, V')` with V' >= V (cropped to V), `labels (B, T)`."""
    student = at_targets(student_logits, labels).float()  # (N, V)
    teacher = at_targets(teacher_logits[..., : student.size(-1)], labels).float()
    teacher_log_probs = F.log_softmax(teacher, dim=-1)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - F.log_softmax(student, dim=-1))).sum()
    agreements = (student.argmax(dim=-1) == teacher.argmax(dim=-1)).sum()
    return torch.stack([kl, agreements.float()])


def agreement_with_cached_teacher(student_logits: torch.Tensor, cached: CachedTeacher,
                                  labels: torch.Tensor) -> torch.Tensor:
    """As `agreement_with_teacher`, against the cached top-k distributions: the KL is between the two models'
    distributions over the teacher's top k tokens and the rest (a lower bound of the full KL), and the teacher's
    most likely token is the first cached one."""
    student, teacher = cached_teacher_buckets(student_logits, cached, labels)
    kl = token_divergence(student, teacher, "forward_kl").sum()
    top_ids = at_targets(cached.top_ids, labels)
    agreements = (at_targets(student_logits, labels).argmax(dim=-1) == top_ids[:, 0]).sum()
    return torch.stack([kl, agreements.float()])
