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
    Only the target positions are gathered before the softmax, so padding costs no memory in the loss.
    """
    vocab_size = student_logits.size(-1)
    if teacher_logits.size(-1) < vocab_size:
        raise ValueError(
            f"the teacher's vocabulary ({teacher_logits.size(-1)}) is smaller than the student's ({vocab_size})"
        )
    student, targets = shift_for_next_token(student_logits, labels)
    teacher = teacher_logits[:, :-1, :vocab_size]
    is_target = targets != IGNORE_INDEX
    student = student[is_target].float() / temperature  # (N, V), N real targets
    teacher = teacher[is_target].float() / temperature
    student_log_probs = F.log_softmax(student, dim=-1)
    teacher_log_probs = F.log_softmax(teacher, dim=-1)
    kl_per_token = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=-1)  # (N,)
    if kl_per_token.numel() == 0:
        # No target in the batch: a zero that still belongs to the graph, like cross_entropy's own result.
        return student.sum() * 0.0
    return temperature**2 * kl_per_token.mean()


class Criterion(torch.nn.Module):
    """Base class of the configurable criteria. `spec()` gives back the configue form that built it."""

    requires_teacher: bool = False

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
        kd = kd_kl_divergence(student_logits, teacher_logits, labels, self.temperature)
        ce = next_token_cross_entropy(student_logits, labels)
        return LossOutput(self.alpha * kd + self.beta * ce, kd, ce)


class ClassicLoss(Criterion):
    """Plain next-token training: the loss is the student's cross-entropy, no teacher is used or loaded."""

    def forward(
        self, student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None
    ) -> LossOutput:
        ce = next_token_cross_entropy(student_logits, labels)
        return LossOutput(ce, None, ce)
