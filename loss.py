"""Training criteria: knowledge distillation (KD + next-token CE) and plain next-token training.

Shapes: B batch, T sequence length, V student vocabulary, V' >= V teacher vocabulary.
Conventions, defined here once for the whole project:
- `labels (B, T)` are the unshifted input ids with -100 wherever a position is not a target (padding, and the
  instruction when it is masked). The logits at position t predict the token at t + 1, so the criteria shift.
- Every term is a mean over the real target tokens of the batch: padding never dilutes or weights a loss.
- The KD term is `temperature**2 * KL(softmax(teacher / T) || softmax(student / T))` over the vocabulary, so that
  its gradient keeps the same scale whatever the temperature (Hinton et al., 2015).
- A teacher with extra tokens beyond the student's vocabulary is cropped to the shared first V entries.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar to back-propagate
    kd: Optional[torch.Tensor]  # scalar KD term, None when there is no teacher
    ce: torch.Tensor  # scalar next-token cross-entropy of the student


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align `logits (B, T, V)` with the tokens they predict: returns `(B, T-1, V)` logits and `(B, T-1)` targets."""
    return logits[:, :-1, :], labels[:, 1:]


def next_token_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over real targets. `student_logits (B, T, V)`, `labels (B, T)` -> scalar."""
    logits, targets = shift_for_next_token(student_logits, labels)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def kd_kl_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """`temperature**2` times the mean over real targets of KL(teacher_T || student_T) over the vocabulary.

    `student_logits (B, T, V)`, `teacher_logits (B, T, V')` with V' >= V, `labels (B, T)` -> scalar.
    """
    return kd_and_cross_entropy(student_logits, teacher_logits, labels, temperature, alpha=1.0, beta=0.0).kd


def kd_and_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
    temperature: float, alpha: float, beta: float,
) -> LossOutput:
    """`alpha * kd_kl_divergence + beta * next_token_cross_entropy`, the same values, computed in one pass.

    `student_logits (B, T, V)`, `teacher_logits (B, T, V')` with V' >= V, `labels (B, T)`. The real target
    positions are gathered once for both terms, and at temperature 1 the student's log-softmax serves both, which
    saves several passes over `(N, V)` tensors (the loss is memory-bound, unlike the matmuls around it).
    """
    vocab_size = student_logits.size(-1)
    if teacher_logits.size(-1) < vocab_size:
        raise ValueError(
            f"the teacher's vocabulary ({teacher_logits.size(-1)}) is smaller than the student's ({vocab_size})"
        )
    student, targets = shift_for_next_token(student_logits, labels)
    is_target = targets != IGNORE_INDEX
    targets = targets[is_target]  # (N,)
    if targets.numel() == 0:
        zero = student_logits.sum() * 0.0  # still part of the graph, like cross_entropy's own result
        return LossOutput(zero, zero, zero)
    student = student[is_target].float()  # (N, V)
    teacher = teacher_logits[:, :-1, :vocab_size][is_target].float()
    student_log_probs = F.log_softmax(student, dim=-1)
    if temperature == 1.0:
        student_log_probs_t, teacher_log_probs_t = student_log_probs, F.log_softmax(teacher, dim=-1)
    else:
        student_log_probs_t = F.log_softmax(student / temperature, dim=-1)
        teacher_log_probs_t = F.log_softmax(teacher / temperature, dim=-1)
    kl_per_token = (teacher_log_probs_t.exp() * (teacher_log_probs_t - student_log_probs_t)).sum(dim=-1)
    kd = temperature**2 * kl_per_token.mean()
    ce = -student_log_probs.gather(1, targets[:, None]).mean()
    return LossOutput(alpha * kd + beta * ce, kd, ce)


class Criterion(torch.nn.Module):
    """Base class of the configurable criteria. `spec()` gives back the configue form that built it."""

    requires_teacher: bool = False
    # False: called with logits (student_logits, labels, teacher_logits). True: with hidden states and output heads.
    uses_hidden_states: bool = False

    def spec(self) -> dict:
        return {"()": f"loss.{type(self).__name__}", **self._arguments()}

    def _arguments(self) -> dict:
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self._arguments().items())


def _number(name: str, value) -> float:
    # YAML 1.1 reads `1e-1` as a string; accept any text that is a plain number.
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, not {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, not {value!r}") from None


class DistillationLoss(Criterion):
    """`alpha * KD + beta * CE`, see the module docstring for the normalisation."""

    requires_teacher = True

    def __init__(self, alpha: float = 1.0, beta: float = 0.1, temperature: float = 1.0) -> None:
        super().__init__()
        self.alpha = _number("alpha", alpha)
        self.beta = _number("beta", beta)
        self.temperature = _number("temperature", temperature)
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"alpha and beta must be >= 0 (got alpha={self.alpha}, beta={self.beta})")
        if self.alpha == 0 and self.beta == 0:
            raise ValueError("alpha and beta are both 0, so nothing would be learned; make at least one positive")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature})")

    def _arguments(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "temperature": self.temperature}

    def forward(
        self, student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None
    ) -> LossOutput:
        if teacher_logits is None:
            raise ValueError("DistillationLoss needs teacher_logits")
        return kd_and_cross_entropy(student_logits, teacher_logits, labels, self.temperature, self.alpha, self.beta)


class ClassicLoss(Criterion):
    """Plain next-token training: the loss is the student's cross-entropy, no teacher is used or loaded."""

    def forward(
        self, student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None
    ) -> LossOutput:
        ce = next_token_cross_entropy(student_logits, labels)
        return LossOutput(ce, None, ce)


class _ChunkedKDCE(torch.autograd.Function):
    """KD + CE from hidden states, projecting to the vocabulary a chunk of positions at a time.

    The gradients with respect to the student's hidden states and head are computed in the forward pass, chunk by
    chunk, from the closed forms d(T**2 KL)/d(student logits) = T (softmax(s / T) - softmax(t / T)) and
    d(CE)/d(student logits) = softmax(s) - onehot(target); so no `(N, V)` tensor outlives its chunk, and backward
    only scales the stored gradients.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_head, teacher_hidden, teacher_head, targets, temperature, alpha, beta,
                chunk_size):
        count = max(targets.numel(), 1)  # no target: both terms are 0
        vocab_size = student_head.size(0)
        hidden_gradient = torch.zeros_like(student_hidden, dtype=torch.float32)
        head_gradient = torch.zeros_like(student_head, dtype=torch.float32)
        kd_total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        ce_total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        head = student_head.float()
        wants_gradients = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]  # not during evaluation
        shared_softmax = temperature == 1.0
        for start in range(0, count, chunk_size):
            rows = slice(start, start + chunk_size)
            hidden = student_hidden[rows].float()
            student_logits = hidden @ head.T  # (C, V)
            teacher_logits = teacher_hidden[rows].float() @ teacher_head[:vocab_size].float().T
            teacher_log_probs_t = F.log_softmax(teacher_logits if shared_softmax else teacher_logits / temperature, dim=-1)
            del teacher_logits
            log_probs = F.log_softmax(student_logits, dim=-1)
            # At temperature 1 one log-softmax serves both terms: the loss is memory-bound, so each pass costs time.
            student_log_probs_t = log_probs if shared_softmax else F.log_softmax(student_logits / temperature, dim=-1)
            del student_logits
            teacher_probs_t = teacher_log_probs_t.exp()
            # In place from here on: at most four (C, V) tensors are alive at once.
            kd_total += (teacher_probs_t * teacher_log_probs_t.sub_(student_log_probs_t)).sum()
            del teacher_log_probs_t
            ce_total -= log_probs.gather(1, targets[rows, None]).sum()
            if not wants_gradients:
                continue
            probabilities = log_probs.exp_()  # softmax(s), and also softmax(s / T) when they are the same tensor
            if shared_softmax:
                logits_gradient = probabilities.mul_(alpha + beta).sub_(teacher_probs_t, alpha=alpha)
            else:
                logits_gradient = student_log_probs_t.exp_().sub_(teacher_probs_t).mul_(alpha * temperature)
                logits_gradient.add_(probabilities, alpha=beta)
            del teacher_probs_t, probabilities, log_probs, student_log_probs_t
            logits_gradient[torch.arange(logits_gradient.size(0), device=logits_gradient.device), targets[rows]] -= beta
            logits_gradient.div_(count)
            hidden_gradient[rows] = logits_gradient @ head
            head_gradient.addmm_(logits_gradient.T, hidden)
        kd = temperature**2 * kd_total / count
        ce = ce_total / count
        ctx.save_for_backward(hidden_gradient.to(student_hidden.dtype), head_gradient.to(student_head.dtype))
        return alpha * kd + beta * ce, kd.detach(), ce.detach()

    @staticmethod
    def backward(ctx, loss_gradient, _kd_gradient, _ce_gradient):
        hidden_gradient, head_gradient = ctx.saved_tensors
        # In place: the stored gradients are used once, and a copy of the head's gradient would cost (V, d) again.
        return (hidden_gradient.mul_(loss_gradient), head_gradient.mul_(loss_gradient),
                None, None, None, None, None, None, None)


def chunked_kd_ce(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    beta: float,
    chunk_size: int = 128,
) -> LossOutput:
    """The DistillationLoss of `student_hidden @ student_head.T` against `teacher_hidden @ teacher_head.T`, without
    ever holding the full logits: `student_hidden (B, T, d)`, `student_head (V, d)`, `teacher_hidden (B, T, d')`,
    `teacher_head (V', d')` with V' >= V, `labels (B, T)`. Same normalisation as the module docstring."""
    hidden, targets = shift_for_next_token(student_hidden, labels)
    is_target = targets != IGNORE_INDEX
    total, kd, ce = _ChunkedKDCE.apply(
        hidden[is_target], student_head, teacher_hidden[:, :-1][is_target], teacher_head, targets[is_target],
        float(temperature), float(alpha), float(beta), chunk_size,
    )
    return LossOutput(total, kd, ce)


class ChunkedDistillationLoss(DistillationLoss):
    """DistillationLoss computed from hidden states a chunk of positions at a time (same values and gradients),
    so that its peak memory is a fraction of the full-logits one. Called with hidden states and output heads."""

    uses_hidden_states = True

    def __init__(self, alpha: float = 1.0, beta: float = 0.1, temperature: float = 1.0, chunk_size: int = 128) -> None:
        super().__init__(alpha, beta, temperature)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a whole number >= 1 (got {chunk_size!r})")
        self.chunk_size = chunk_size

    def _arguments(self) -> dict:
        return {**super()._arguments(), "chunk_size": self.chunk_size}

    def forward(self, student_hidden, student_head, labels, teacher_hidden, teacher_head) -> LossOutput:  # type: ignore[override]
        return chunked_kd_ce(
            student_hidden, student_head, teacher_hidden, teacher_head, labels,
            self.temperature, self.alpha, self.beta, self.chunk_size,
        )
