"""The fused KD + CE loss behind `loss.ChunkedDistillationLoss` (which `loss.DistillationLoss` becomes where it is
faster): the full-vocabulary loss of `hidden @ head.T`, projected a chunk of positions at a time, so that no `(N, V)`
tensor outlives its chunk, for every divergence of `divergences.DIVERGENCES`.

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


def _forward_kl_chunk(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      terms: FusedTerms, count: int, wants_gradient: bool):
    """(KL sum, CE sum, gradient of the objective with respect to the chunk's logits `(C, V)` or None), in place
    wherever a tensor is used for the last time: at most four `(C, V)` tensors are alive at once."""
    temperature, alpha, beta = terms.temperature, terms.alpha, terms.beta
    shared_softmax = temperature == 1.0  # one log-softmax serves both terms: the loss is memory-bound
    teacher_log_probs_t = F.log_softmax(teacher_logits if shared_softmax else teacher_logits / temperature, dim=-1)
    log_probs = F.log_softmax(student_logits, dim=-1)
    student_log_probs_t = log_probs if shared_softmax else F.log_softmax(student_logits / temperature, dim=-1)
    teacher_probs_t = teacher_log_probs_t.exp()
    kd_sum = (teacher_probs_t * teacher_log_probs_t.sub_(student_log_probs_t)).sum()
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
        vocab_size = student_head.size(0)
        wants_gradient = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]  # not during evaluation
        # Cast once, not per chunk: a (V, d) copy each.
        head = student_head.to(compute_dtype)
        teacher_head = teacher_head[:vocab_size].to(compute_dtype)
        hidden_gradient = torch.zeros_like(student_hidden, dtype=torch.float32) if wants_gradient else None
        head_gradient = torch.zeros_like(student_head, dtype=torch.float32) if wants_gradient else None
        kd_total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        ce_total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        chunk_terms = _forward_kl_chunk if terms.has_closed_form else _any_divergence_chunk
        for start in range(0, targets.numel(), terms.chunk_size):
            rows = slice(start, start + terms.chunk_size)
            hidden = student_hidden[rows].to(compute_dtype)
            student_logits = (hidden @ head.T).float()  # (C, V)
            teacher_logits = (teacher_hidden[rows].to(compute_dtype) @ teacher_head.T).float()
            kd_sum, ce_sum, logits_gradient = chunk_terms(student_logits, teacher_logits, targets[rows], terms,
                                                          count, wants_gradient)
            del student_logits, teacher_logits
            kd_total += kd_sum
            ce_total += ce_sum
            if logits_gradient is not None:
                _accumulate(logits_gradient.to(compute_dtype), hidden, head, hidden_gradient[rows], head_gradient)
        kd = terms.temperature**2 * kd_total / count
        ce = ce_total / count
        # Kept on ctx rather than saved, so that backward hands them over without a copy.
        ctx.gradients = (hidden_gradient, head_gradient, student_hidden.dtype, student_head.dtype)
        return terms.alpha * kd + terms.beta * ce, kd, ce

    @staticmethod
    def backward(ctx, loss_gradient, _kd_gradient, _ce_gradient):
        hidden_gradient, head_gradient, hidden_dtype, head_dtype = ctx.gradients
        ctx.gradients = None
        # In place: the stored gradients are used once, and a copy of the head's gradient would cost (V, d) again.
        return (hidden_gradient.mul_(loss_gradient).to(hidden_dtype), head_gradient.mul_(loss_gradient).to(head_dtype),
                None, None, None, None, None)


def _accumulate(logits_gradient: torch.Tensor, hidden: torch.Tensor, head: torch.Tensor,
                hidden_gradient_rows: torch.Tensor, head_gradient: torch.Tensor) -> None:
    """The chain rule through `hidden @ head.T` for one chunk, into the float32 buffers: `(C, d)` rows of the
    hidden states' gradient and the whole `(V, d)` head's."""
    hidden_gradient_rows.copy_(logits_gradient @ head)
    if logits_gradient.dtype == head_gradient.dtype:
        head_gradient.addmm_(logits_gradient.T, hidden)
    else:  # a 16-bit product, summed over chunks in float32 (CPUs have no mixed-dtype addmm)
        head_gradient += logits_gradient.T @ hidden


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
