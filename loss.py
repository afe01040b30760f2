"""Training criteria: knowledge distillation (KD + next-token CE) and plain next-token training.

Shapes: B batch, T sequence length, V student vocabulary, V' >= V teacher vocabulary, d hidden width.
Conventions, defined here once for the whole project:
- `labels (B, T)` are the unshifted input ids with -100 wherever a position is not a target (padding, and the
  instruction when it is masked). The logits at position t predict the token at t + 1, so the criteria shift.
- Every term is a mean over the real target tokens of the batch: padding never dilutes or weights a loss.
- Temperature: every KD divergence D (see `DIVERGENCES`) is computed between the temperature-softened distributions
  p = softmax(teacher / T) and q = softmax(student / T), and multiplied by T**2, so that the gradient of the
  KL-type terms keeps the same scale whatever the temperature (Hinton et al., 2015). The KD term is thus
  `T**2 * mean over real targets of D(p, q)`; the CE term always uses the student at temperature 1.
- A teacher with extra tokens beyond the student's vocabulary is cropped to the shared first V entries.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# p is the teacher's distribution, q the student's.
DIVERGENCES = (
    "forward_kl",  # KL(p || q)
    "reverse_kl",  # KL(q || p)
    # Generalised Jensen-Shannon (GKD), m = jsd_beta p + (1 - jsd_beta) q: jsd_beta KL(p||m) + (1 - jsd_beta) KL(q||m).
    # As in TRL, jsd_beta 0 gives KL(p || q) and 1 gives KL(q || p) (the mixture alone would give 0 at both ends).
    "jsd",
    "skew_kl",  # DistiLLM: KL(p || skew p + (1 - skew) q)
    "skew_reverse_kl",  # DistiLLM: KL(q || skew q + (1 - skew) p)
    "tv",  # total variation: 0.5 sum |p - q|
)
SKEW_DIVERGENCES = ("skew_kl", "skew_reverse_kl")


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar to back-propagate
    kd: Optional[torch.Tensor]  # scalar KD term, None when there is no teacher
    ce: torch.Tensor  # scalar next-token cross-entropy of the student
    hidden: Optional[torch.Tensor] = None  # scalar hidden-state cosine term, None when not used


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align `logits (B, T, V)` with the tokens they predict: returns `(B, T-1, V)` logits and `(B, T-1)` targets."""
    return logits[:, :-1, :], labels[:, 1:]


def next_token_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over real targets. `student_logits (B, T, V)`, `labels (B, T)` -> scalar."""
    logits, targets = shift_for_next_token(student_logits, labels)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def check_divergence(divergence: str, jsd_beta: float = 0.5, skew: float = 0.1) -> None:
    """Raise ValueError unless `divergence` is one of `DIVERGENCES` and `jsd_beta` and `skew` lie in [0, 1]."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; use one of {', '.join(DIVERGENCES)}")
    for name, value in (("jsd_beta", jsd_beta), ("skew", skew)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1 (got {value})")


def _kl_divergence(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-row KL(a || b) from `(N, K)` log-probabilities, with 0 log 0 = 0.

    Where b is exactly 0 but a is not, the KL is infinite and its gradient NaN; such a b counts as the smallest
    normal probability of the dtype instead, so that a teacher with zeros still trains a reverse KL.
    """
    in_support = log_a > float("-inf")
    log_b = torch.where(torch.isneginf(log_b), math.log(torch.finfo(log_b.dtype).tiny), log_b)
    # Masking the difference, not the product, keeps 0 * inf out of the backward pass too.
    difference = torch.where(in_support, log_a - log_b, 0.0)
    return (log_a.exp() * difference).sum(dim=-1)


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b) from log-probabilities, in log space for stability."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)
    # logaddexp's gradient is NaN where both inputs are -inf, even when unused: give it finite stand-ins there.
    log_a = torch.where(both_zero, 0.0, log_a)
    log_b = torch.where(both_zero, 0.0, log_b)
    mixture = torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))
    return torch.where(both_zero, float("-inf"), mixture)


def token_divergence(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, divergence: str,
    jsd_beta: float = 0.5, skew: float = 0.1,
) -> torch.Tensor:
    """Per-row divergence between the teacher's distribution p and the student's q, see `DIVERGENCES`.

    `student_log_probs (N, K)` and `teacher_log_probs (N, K)` are log-probabilities over the same K outcomes
    (the vocabulary or any other bucketing) -> `(N,)`. Exact zeros (-inf) give neither NaN values nor NaN gradients.
    """
    check_divergence(divergence, jsd_beta, skew)
    if student_log_probs.shape != teacher_log_probs.shape:
        raise ValueError(
            f"the student's and the teacher's log-probabilities differ in shape "
            f"({tuple(student_log_probs.shape)} and {tuple(teacher_log_probs.shape)})"
        )
    log_p, log_q = teacher_log_probs, student_log_probs
    if divergence == "forward_kl" or (divergence == "jsd" and jsd_beta == 0.0):
        return _kl_divergence(log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and jsd_beta == 1.0):
        return _kl_divergence(log_q, log_p)
    if divergence == "jsd":
        log_m = _log_mixture(log_p, log_q, jsd_beta)
        return jsd_beta * _kl_divergence(log_p, log_m) + (1.0 - jsd_beta) * _kl_divergence(log_q, log_m)
    if divergence == "skew_kl":
        return _kl_divergence(log_p, _log_mixture(log_p, log_q, skew))
    if divergence == "skew_reverse_kl":
        return _kl_divergence(log_q, _log_mixture(log_q, log_p, skew))
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)  # tv


def kd_kl_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """`temperature**2` times the mean over real targets of KL(teacher_T || student_T) over the vocabulary.

    `student_logits (B, T, V)`, `teacher_logits (B, T, V')` with V' >= V, `labels (B, T)` -> scalar.
    """
    return kd_and_cross_entropy(student_logits, teacher_logits, labels, temperature, alpha=1.0, beta=0.0).kd


def _gather_real_targets(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The shifted logits at the real target positions only: float32 student `(N, V)` and teacher `(N, V)` (cropped
    to the student's vocabulary) and the targets `(N,)`; None when the batch has no target at all."""
    vocab_size = student_logits.size(-1)
    if teacher_logits.size(-1) < vocab_size:
        raise ValueError(
            f"the teacher's vocabulary ({teacher_logits.size(-1)}) is smaller than the student's ({vocab_size})"
        )
    student, targets = shift_for_next_token(student_logits, labels)
    is_target = targets != IGNORE_INDEX
    targets = targets[is_target]  # (N,)
    if targets.numel() == 0:
        return None
    student = student[is_target].float()  # (N, V)
    teacher = teacher_logits[:, :-1, :vocab_size][is_target].float()
    return student, teacher, targets


def _log_softmaxes(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's log-probabilities at temperature 1 (for the CE), and the student's and the teacher's at
    `temperature`; at temperature 1 the first serves twice, which saves a pass over `(N, V)`."""
    student_log_probs = F.log_softmax(student, dim=-1)
    if temperature == 1.0:
        return student_log_probs, student_log_probs, F.log_softmax(teacher, dim=-1)
    return (
        student_log_probs, F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1)
    )


def _zero_output(student_logits: torch.Tensor) -> LossOutput:
    zero = student_logits.sum() * 0.0  # still part of the graph, like cross_entropy's own result
    return LossOutput(zero, zero, zero)


def kd_and_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
    temperature: float, alpha: float, beta: float,
) -> LossOutput:
    """`alpha * kd_kl_divergence + beta * next_token_cross_entropy`, the same values, computed in one pass.

    `student_logits (B, T, V)`, `teacher_logits (B, T, V')` with V' >= V, `labels (B, T)`. The real target
    positions are gathered once for both terms, and at temperature 1 the student's log-softmax serves both, which
    saves several passes over `(N, V)` tensors (the loss is memory-bound, unlike the matmuls around it). The teacher's
    logits must be finite, as a model's are: masking out zeros would cost a pass (`token_divergence` does it).
    """
    gathered = _gather_real_targets(student_logits, teacher_logits, labels)
    if gathered is None:
        return _zero_output(student_logits)
    student, teacher, targets = gathered
    student_log_probs, student_log_probs_t, teacher_log_probs_t = _log_softmaxes(student, teacher, temperature)
    kl_per_token = (teacher_log_probs_t.exp() * (teacher_log_probs_t - student_log_probs_t)).sum(dim=-1)
    kd = temperature**2 * kl_per_token.mean()
    ce = -student_log_probs.gather(1, targets[:, None]).mean()
    return LossOutput(alpha * kd + beta * ce, kd, ce)


def kd_and_cross_entropy_from_log_probs(
    student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor, target_log_probs: torch.Tensor,
    temperature: float, alpha: float, beta: float,
    divergence: str = "forward_kl", jsd_beta: float = 0.5, skew: float = 0.1,
) -> LossOutput:
    """`alpha * KD + beta * CE` from what is left once the real target positions are gathered.

    `student_log_probs (N, K)` and `teacher_log_probs (N, K)`: log-probabilities at `temperature` over the same K
    outcomes (the vocabulary, or buckets such as top-k tokens plus the rest); `target_log_probs (N,)`: the student's
    log-probability of each target at temperature 1. N must be > 0.
    """
    kd = temperature**2 * token_divergence(student_log_probs, teacher_log_probs, divergence, jsd_beta, skew).mean()
    ce = -target_log_probs.mean()
    return LossOutput(alpha * kd + beta * ce, kd, ce)


def divergence_and_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
    temperature: float, alpha: float, beta: float,
    divergence: str = "forward_kl", jsd_beta: float = 0.5, skew: float = 0.1,
) -> LossOutput:
    """`alpha * KD + beta * CE` with any of `DIVERGENCES` over the vocabulary; same shapes as `kd_and_cross_entropy`
    (which is faster for forward_kl)."""
    check_divergence(divergence, jsd_beta, skew)
    gathered = _gather_real_targets(student_logits, teacher_logits, labels)
    if gathered is None:
        return _zero_output(student_logits)
    student, teacher, targets = gathered
    student_log_probs, student_log_probs_t, teacher_log_probs_t = _log_softmaxes(student, teacher, temperature)
    target_log_probs = student_log_probs.gather(1, targets[:, None]).squeeze(1)
    return kd_and_cross_entropy_from_log_probs(
        student_log_probs_t, teacher_log_probs_t, target_log_probs, temperature, alpha, beta, divergence, jsd_beta, skew
    )


def hidden_cosine_distance(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean over real targets of `1 - cosine(student_hidden, teacher_hidden)`, at the positions whose logits the KD
    term scores (shifted like them). `student_hidden (B, T, d)`, `teacher_hidden (B, T, d)`, `labels (B, T)`."""
    if student_hidden.size(-1) != teacher_hidden.size(-1):
        raise ValueError(
            f"the student's hidden width ({student_hidden.size(-1)}) differs from the teacher's "
            f"({teacher_hidden.size(-1)}); the cosine term needs models of the same hidden size"
        )
    student, targets = shift_for_next_token(student_hidden, labels)
    is_target = targets != IGNORE_INDEX
    student = student[is_target]  # (N, d)
    if student.size(0) == 0:
        return student_hidden.sum() * 0.0  # still part of the graph
    cosine = F.cosine_similarity(student.float(), teacher_hidden[:, :-1][is_target].float(), dim=-1)
    return (1.0 - cosine).mean()


class CachedTeacher(NamedTuple):
    """The teacher's distributions as `teacher_cache` keeps them, at temperature 1, aligned with the logits."""

    top_ids: torch.Tensor  # (B, T, K) the teacher's K most likely next tokens, most likely first
    top_log_probs: torch.Tensor  # (B, T, K) their log-probabilities
    rest_log_prob: torch.Tensor  # (B, T) log of the probability of all other tokens


def cached_teacher_buckets(
    student_logits: torch.Tensor, cached: CachedTeacher, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' distributions over K + 1 outcomes at the real target positions: the teacher's top K tokens,
    then all the others together. `student_logits (B, T, V)`, `cached` as above, `labels (B, T)` -> student and
    teacher log-probabilities `(N, K + 1)`, at temperature 1. Any divergence between these is at most the
    full-vocabulary one (merging outcomes never increases a divergence), and equal when the top K hold the mass."""
    student, targets = shift_for_next_token(student_logits, labels)
    is_target = targets != IGNORE_INDEX
    student_log_probs = F.log_softmax(student[is_target].float(), dim=-1)  # (N, V)
    top_ids = cached.top_ids[:, :-1][is_target]  # (N, K)
    student_top = student_log_probs.gather(1, top_ids)
    student_rest = student_log_probs.scatter(1, top_ids, float("-inf")).logsumexp(dim=-1, keepdim=True)
    teacher = torch.cat([cached.top_log_probs[:, :-1][is_target], cached.rest_log_prob[:, :-1][is_target, None]], -1)
    return torch.cat([student_top, student_rest], dim=-1), teacher.float()


def cached_teacher_kd_and_cross_entropy(
    student_logits: torch.Tensor, cached: CachedTeacher, labels: torch.Tensor, alpha: float, beta: float,
    divergence: str = "forward_kl", jsd_beta: float = 0.5, skew: float = 0.1,
) -> LossOutput:
    """`alpha * KD + beta * CE` against a cached teacher (temperature 1), the KD over the K + 1 outcomes of
    `cached_teacher_buckets`. `student_logits (B, T, V)`, `labels (B, T)`."""
    if not (labels[:, 1:] != IGNORE_INDEX).any():
        return _zero_output(student_logits)
    student_buckets, teacher_buckets = cached_teacher_buckets(student_logits, cached, labels)
    ce = next_token_cross_entropy(student_logits, labels)
    kd = token_divergence(student_buckets, teacher_buckets, divergence, jsd_beta, skew).mean()
    return LossOutput(alpha * kd + beta * ce, kd, ce)


def agreement_with_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
    """`(2,)`: summed over the real target positions, KL(teacher || student) at temperature 1 and the number of
    positions where the two models' most likely next token is the same. `student_logits (B, T, V)`,
    `teacher_logits (B, T, V')` with V' >= V (cropped to V), `labels (B, T)`."""
    student, targets = shift_for_next_token(student_logits, labels)
    is_target = targets != IGNORE_INDEX
    student = student[is_target].float()  # (N, V)
    teacher = teacher_logits[:, :-1, : student.size(-1)][is_target].float()
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
    top_ids = cached.top_ids[:, :-1][labels[:, 1:] != IGNORE_INDEX]
    agreements = (student_logits[:, :-1][labels[:, 1:] != IGNORE_INDEX].argmax(dim=-1) == top_ids[:, 0]).sum()
    return torch.stack([kl, agreements.float()])


class Criterion(torch.nn.Module):
    """Base class of the configurable criteria. `spec()` gives back the configue form that built it."""

    requires_teacher: bool = False
    # False: called with logits (student_logits, labels, teacher_logits). True: with hidden states and output heads.
    uses_hidden_states: bool = False
    # True: the logits call also needs the models' last hidden states (student_hidden=, teacher_hidden=).
    uses_last_hidden_state: bool = False

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
    """`alpha * KD + beta * CE + hidden_weight * (1 - cosine of the last hidden states)`, each a mean over real
    targets (see the module docstring); the KD divergence is one of `DIVERGENCES`."""

    requires_teacher = True

    def __init__(
        self, alpha: float = 1.0, beta: float = 0.1, temperature: float = 1.0, divergence: str = "forward_kl",
        jsd_beta: float = 0.5, skew: float = 0.1, hidden_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.alpha = _number("alpha", alpha)
        self.beta = _number("beta", beta)
        self.temperature = _number("temperature", temperature)
        self.divergence = divergence
        self.jsd_beta = _number("jsd_beta", jsd_beta)
        self.skew = _number("skew", skew)
        self.hidden_weight = _number("hidden_weight", hidden_weight)
        if self.alpha < 0 or self.beta < 0:
            raise ValueError(f"alpha and beta must be >= 0 (got alpha={self.alpha}, beta={self.beta})")
        if not self.hidden_weight >= 0:
            raise ValueError(f"hidden_weight must be >= 0 (got {self.hidden_weight})")
        if self.alpha == 0 and self.beta == 0 and self.hidden_weight == 0:
            raise ValueError(
                "alpha and beta are both 0 and so is hidden_weight, so nothing would be learned; "
                "make at least one positive"
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature})")
        check_divergence(self.divergence, self.jsd_beta, self.skew)

    @property
    def uses_last_hidden_state(self) -> bool:  # type: ignore[override]
        return self.hidden_weight > 0

    def _arguments(self) -> dict:
        # Only what differs from the defaults, so that the spec (part of a run's identity) of older runs still matches.
        arguments = {"alpha": self.alpha, "beta": self.beta, "temperature": self.temperature}
        if self.divergence != "forward_kl":
            arguments["divergence"] = self.divergence
        if self.divergence == "jsd" and self.jsd_beta != 0.5:
            arguments["jsd_beta"] = self.jsd_beta
        if self.divergence in SKEW_DIVERGENCES and self.skew != 0.1:
            arguments["skew"] = self.skew
        if self.hidden_weight != 0:
            arguments["hidden_weight"] = self.hidden_weight
        return arguments

    def forward(
        self, student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None,
        student_hidden: Optional[torch.Tensor] = None, teacher_hidden: Optional[torch.Tensor] = None,
    ) -> LossOutput:
        if teacher_logits is None:
            raise ValueError("DistillationLoss needs teacher_logits")
        if self.hidden_weight > 0 and (student_hidden is None or teacher_hidden is None):
            raise ValueError(
                "DistillationLoss with hidden_weight > 0 needs the student's and the teacher's last hidden states "
                "(student_hidden and teacher_hidden)"
            )
        if self.divergence == "forward_kl":
            output = kd_and_cross_entropy(
                student_logits, teacher_logits, labels, self.temperature, self.alpha, self.beta
            )
        else:
            output = divergence_and_cross_entropy(
                student_logits, teacher_logits, labels, self.temperature, self.alpha, self.beta,
                self.divergence, self.jsd_beta, self.skew,
            )
        if self.hidden_weight == 0:
            return output
        hidden = hidden_cosine_distance(student_hidden, teacher_hidden, labels)
        return LossOutput(output.loss + self.hidden_weight * hidden, output.kd, output.ce, hidden)


    def from_cached_teacher(self, student_logits: torch.Tensor, labels: torch.Tensor,
                            cached: CachedTeacher) -> LossOutput:
        """The same loss against the teacher's cached top-k distributions (temperature 1, no hidden states)."""
        if self.temperature != 1.0 or self.hidden_weight != 0:
            raise ValueError("a cached teacher holds probabilities at temperature 1 and no hidden states")
        return cached_teacher_kd_and_cross_entropy(
            student_logits, cached, labels, self.alpha, self.beta, self.divergence, self.jsd_beta, self.skew
        )


class ClassicLoss(Criterion):
    """Plain next-token training: the loss is the student's cross-entropy, no teacher is used or loaded."""

    uses_last_hidden_state = False

    def forward(
        self, student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None,
        student_hidden: Optional[torch.Tensor] = None, teacher_hidden: Optional[torch.Tensor] = None,
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
    so that its peak memory is a fraction of the full-logits one. Called with hidden states and output heads.
    Forward KL only, without the hidden-state term."""

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
