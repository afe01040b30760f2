"""The fused KD + CE loss behind `loss.ChunkedDistillationLoss` (as which `loss.DistillationLoss` runs, unless FSDP
shards the output head): the full-vocabulary loss of `hidden @ head.T`, projected a chunk of positions at a time, so
that no `(N, V)` tensor outlives its chunk, for every divergence of `divergences.DIVERGENCES`.

Shapes: N real target positions (already gathered), d and d' hidden widths, V student and V' >= V teacher
vocabularies, C positions per chunk. The normalisation is `loss.py`'s: `T**2` times the mean divergence over targets,
the mean CE. Precision: the projections run in the autocast dtype when autocast is on at the call (bf16 on a GPU or
an AMX CPU: most of the step's matmul FLOPs are the heads'), the softmaxes and every sum in float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from divergences import token_divergence


@dataclass(frozen=True)
class FusedTerms:
    """What the fused loss computes: `alpha * T**2 * mean divergence + beta * mean CE`."""

    temperature: float
    alpha: float
    beta: float
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    skew: float = 0.1
    chunk_size: int = 128

    @property
    def has_closed_form(self) -> bool:
        """Forward KL (jsd with jsd_beta 0 is the same) has a closed-form gradient, which saves the autograd graph
        of the chunk: d(T**2 KL)/ds = T (softmax(s / T) - softmax(t / T))."""
        return self.divergence == "forward_kl" or (self.divergence == "jsd" and self.jsd_beta == 0.0)


def _log_softmax_(logits: torch.Tensor, rows_at_once: int = 16) -> torch.Tensor:
    """log_softmax over the last dimension, written over its input: no new `(C, V)` tensor (the chunk's peak memory
    is the count of those, and on a CPU each fresh one also costs its page faults). PyTorch's kernel takes its input
    as its output but goes through a temporary of the output's size, so a few rows at a time: the temporary stays
    small (16 x V), and it is twice as fast as a logsumexp and a subtraction."""
    for start in range(0, logits.size(0), rows_at_once):
        rows = logits[start : start + rows_at_once]
        torch.log_softmax(rows, dim=-1, out=rows)
    return logits


def _forward_kl_chunk(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      terms: FusedTerms, count: int, wants_gradient: bool):
    """(KL sum, CE sum, gradient of the objective with respect to the chunk's logits `(C, V)` or None). Both
    logits tensors are the callee's to overwrite: at temperature 1 at most three `(C, V)` tensors exist at once."""
    temperature, alpha, beta = terms.temperature, terms.alpha, terms.beta
    shared_softmax = temperature == 1.0  # one log-softmax serves both terms: the loss is memory-bound
    teacher_log_probs_t = _log_softmax_(teacher_logits if shared_softmax else teacher_logits.div_(temperature))
    student_log_probs_t = None if shared_softmax else _log_softmax_(student_logits / temperature)
    log_probs = _log_softmax_(student_logits)
    if shared_softmax:
        student_log_probs_t = log_probs
    teacher_probs_t = teacher_log_probs_t.exp()
    # sum of p (log p - log q), as a dot product: no (C, V) product tensor.
    kd_sum = torch.dot(teacher_probs_t.flatten(), teacher_log_probs_t.sub_(student_log_probs_t).flatten())
    del teacher_log_probs_t
    ce_sum = -log_probs.gather(1, targets[:, None]).sum()
    if not wants_gradient:
        return kd_sum, ce_sum, None
    probabilities = log_probs.exp_()  # softmax(s), and also softmax(s / T) when they are the same tensor
    if shared_softmax:
        gradient = probabilities.mul_(alpha + beta).sub_(teacher_probs_t, alpha=alpha)
    else:
        gradient = student_log_probs_t.exp_().sub_(teacher_probs_t).mul_(alpha * temperature)
        gradient.add_(probabilities, alpha=beta)
    del teacher_probs_t, probabilities, log_probs, student_log_probs_t
    gradient[torch.arange(gradient.size(0), device=gradient.device), targets] -= beta
    return kd_sum, ce_sum, gradient.div_(count)


def _any_divergence_chunk(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                          terms: FusedTerms, count: int, wants_gradient: bool):
    """As `_forward_kl_chunk` for any divergence, by autograd over the chunk's logits only: the divergence is
    `divergences.token_divergence`, the very function of the full-logits loss."""
    temperature = terms.temperature
    with torch.enable_grad() if wants_gradient else contextlib.nullcontext():
        logits = student_logits.requires_grad_(wants_gradient)
        log_probs = F.log_softmax(logits, dim=-1)
        student_log_probs_t = log_probs if temperature == 1.0 else F.log_softmax(logits / temperature, dim=-1)
        teacher_log_probs_t = F.log_softmax(teacher_logits / temperature, dim=-1)
        kd_sum = token_divergence(student_log_probs_t, teacher_log_probs_t, terms.divergence, terms.jsd_beta,
                                  terms.skew).sum()
        ce_sum = -log_probs.gather(1, targets[:, None]).sum()
        if not wants_gradient:
            return kd_sum, ce_sum, None
        objective = (terms.alpha * temperature**2 * kd_sum + terms.beta * ce_sum) / count
        (gradient,) = torch.autograd.grad(objective, logits)
    return kd_sum.detach(), ce_sum.detach(), gradient


class FusedDivergenceCE(torch.autograd.Function):
    """KD + CE from hidden states, projecting to the vocabulary a chunk of positions at a time.

    The gradients with respect to the student's hidden states and head are computed in the forward pass, chunk by
    chunk, from the gradient with respect to each chunk's logits; so no `(N, V)` tensor outlives its chunk, and
    backward only scales the stored gradients.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_head, teacher_hidden, teacher_head, targets, terms: FusedTerms,
                compute_dtype: torch.dtype):
        count = max(targets.numel(), 1)  # no target: both terms are 0
        wants_gradient = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]  # not during evaluation
        # Cast once, not per chunk: a (V, d) copy each.
        heads = student_head.to(compute_dtype), teacher_head[: student_head.size(0)].to(compute_dtype)
        hidden_gradient = torch.zeros_like(student_hidden, dtype=torch.float32) if wants_gradient else None
        # The head's gradient is the first group's product, then the sum: no (V, d) zeros to write and add.
        no_target = wants_gradient and targets.numel() == 0
        head_gradient = torch.zeros_like(student_head, dtype=torch.float32) if no_target else None
        kd_total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        ce_total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        for group in _groups(targets.numel(), terms.chunk_size, compute_dtype):
            hidden_gradient_rows = hidden_gradient[group] if wants_gradient else None
            kd_sum, ce_sum, head_gradient = _project_group(student_hidden[group], teacher_hidden[group],
                                                           targets[group], heads, terms, count, hidden_gradient_rows,
                                                           head_gradient)
            kd_total += kd_sum
            ce_total += ce_sum
        kd = terms.temperature**2 * kd_total / count
        ce = ce_total / count
        # Kept on ctx rather than saved, so that backward hands them over without a copy.
        ctx.gradients = hidden_gradient, head_gradient, student_hidden.dtype, student_head.dtype
        ctx.mark_non_differentiable(kd, ce)
        return terms.alpha * kd + terms.beta * ce, kd, ce

    @staticmethod
    def backward(ctx, loss_gradient, _kd_gradient, _ce_gradient):
        hidden_gradient, head_gradient, hidden_dtype, head_dtype = ctx.gradients
        ctx.gradients = None
        # In place: the stored gradients are used once, and a copy of the head's gradient would cost (V, d) again.
        return (hidden_gradient.mul_(loss_gradient).to(hidden_dtype), head_gradient.mul_(loss_gradient).to(head_dtype),
                None, None, None, None, None)


# Rows whose 16-bit logits gradients are kept for one product with the head: (rows, V) 16-bit values, 200 MiB at
# V = 50257. A float32 (V, d) head gradient cannot be accumulated in place from 16-bit operands (CPUs have no
# mixed-dtype addmm), and converting and adding it once per chunk cost more than the products themselves.
ROWS_PER_HEAD_PRODUCT = 2048


def _groups(count: int, chunk_size: int, compute_dtype: torch.dtype) -> list[slice]:
    """Slices of the N positions, each projected chunk by chunk and multiplied by the head once: one chunk each in
    float32 (the product accumulates in place), several in 16 bits."""
    rows = chunk_size if compute_dtype == torch.float32 else max(chunk_size, ROWS_PER_HEAD_PRODUCT)
    return [slice(start, start + rows) for start in range(0, count, rows)]


def _project_group(student_hidden, teacher_hidden, targets, heads, terms: FusedTerms, count: int,
                   hidden_gradient_rows: Optional[torch.Tensor], head_gradient: Optional[torch.Tensor]):
    """The KD and CE sums of a group of G positions (`(G, d)` hidden states) and the head's float32 gradient so far
    (None before the first group); with `hidden_gradient_rows` (the group's `(G, d)` rows of the hidden states'
    float32 gradient), the group's gradients are written there and added to the head's."""
    student_head, teacher_head = heads
    hidden, teacher_hidden = student_hidden.to(student_head.dtype), teacher_hidden.to(teacher_head.dtype)
    chunk_terms = _forward_kl_chunk if terms.has_closed_form else _any_divergence_chunk
    chunks = range(0, targets.numel(), terms.chunk_size)
    wants_gradient = hidden_gradient_rows is not None
    logits_gradient = None  # (G, V) in the compute dtype
    if wants_gradient and len(chunks) > 1:
        logits_gradient = hidden.new_empty(targets.numel(), student_head.size(0))
    kd_total = ce_total = 0.0
    for start in chunks:
        rows = slice(start, start + terms.chunk_size)
        student_logits = (hidden[rows] @ student_head.T).float()  # (C, V)
        teacher_logits = (teacher_hidden[rows] @ teacher_head.T).float()
        kd_sum, ce_sum, chunk_gradient = chunk_terms(student_logits, teacher_logits, targets[rows], terms, count,
                                                     wants_gradient)
        del student_logits, teacher_logits
        kd_total, ce_total = kd_total + kd_sum, ce_total + ce_sum
        if chunk_gradient is None:
            continue
        if logits_gradient is None:
            logits_gradient = chunk_gradient.to(hidden.dtype)
        else:
            logits_gradient[rows] = chunk_gradient
    if not wants_gradient:
        return kd_total, ce_total, head_gradient
    hidden_gradient_rows.copy_(logits_gradient @ student_head)
    if head_gradient is None:
        head_gradient = (logits_gradient.T @ hidden).float()
    elif logits_gradient.dtype == head_gradient.dtype:
        head_gradient.addmm_(logits_gradient.T, hidden)
    else:
        head_gradient += logits_gradient.T @ hidden
    return kd_total, ce_total, head_gradient


def fused_divergence_ce(student_hidden: torch.Tensor, student_head: torch.Tensor, teacher_hidden: torch.Tensor,
                        teacher_head: torch.Tensor, targets: torch.Tensor, terms: FusedTerms,
                        compute_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(alpha * KD + beta * CE, KD, CE)` of `student_hidden (N, d) @ student_head (V, d).T` against
    `teacher_hidden (N, d') @ teacher_head (V', d').T` with the targets `(N,)`; differentiable in the student's
    hidden states and head. The projections run in `compute_dtype`; by default the autocast dtype where autocast is
    on at the call, else float32."""
    device_type = student_hidden.device.type
    if compute_dtype is None:
        autocast_on = torch.is_autocast_enabled(device_type)
        compute_dtype = torch.get_autocast_dtype(device_type) if autocast_on else torch.float32
    with torch.autocast(device_type, enabled=False):  # the casts are explicit here
        return FusedDivergenceCE.apply(student_hidden, student_head, teacher_hidden, teacher_head, targets, terms,
                                       compute_dtype)

