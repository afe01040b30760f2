"""Training criteria: knowledge distillation (KD + next-token CE) and plain next-token training.

Shapes: B batch, T sequence length, V student vocabulary, V' >= V teacher vocabulary, d hidden width.
Conventions, defined here once for the whole project:
- `labels (B, T)` are the unshifted input ids with -100 wherever a position is not a target (padding, and the
  instruction when it is masked). The logits at position t predict the token at t + 1, so the criteria shift.
- Every term is a mean over the real target tokens of the batch: padding never dilutes or weights a loss.
- Temperature: every KD divergence D (see `divergences.DIVERGENCES`) is computed between the temperature-softened distributions
  p = softmax(teacher / T) and q = softmax(student / T), and multiplied by T**2, so that the gradient of the
  KL-type terms keeps the same scale whatever the temperature (Hinton et al., 2015). The KD term is thus
  `T**2 * mean over real targets of D(p, q)`; the CE term always uses the student at temperature 1.
- A teacher with extra tokens beyond the student's vocabulary is cropped to the shared first V entries.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from distillation.data.batching import IGNORE_INDEX
from distillation.kernels.chunked_loss import FusedTerms, fused_divergence_ce, fused_figures
from distillation.kernels.divergences import SKEW_DIVERGENCES, check_divergence, kl_divergence, token_divergence
from distillation.settings.values import as_number


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar to back-propagate
    kd: torch.Tensor | None  # scalar KD term, None when there is no teacher
    ce: torch.Tensor  # scalar next-token cross-entropy of the student
    hidden: torch.Tensor | None = None  # scalar hidden-state cosine term, None when not used


class ModelOutput(NamedTuple):
    """What a criterion reads of one model's forward pass on a batch (what it does not read is None)."""

    logits: torch.Tensor | None = None  # (B, T, V)
    hidden: torch.Tensor | None = None  # (B, T, d) the last hidden state, after the final norm
    head: torch.Tensor | None = None  # (V, d) the output head's weight, for a criterion that projects `hidden`


class CachedTeacher(NamedTuple):
    """The teacher's distributions as `teacher_cache` keeps them, at temperature 1, aligned with the logits."""

    top_ids: torch.Tensor  # (B, T, K) the teacher's K most likely next tokens, most likely first
    top_log_probs: torch.Tensor  # (B, T, K) their log-probabilities
    rest_log_prob: torch.Tensor  # (B, T) log of the probability of all other tokens


# What a criterion is given of the teacher: its forward pass, or its cached distributions (or None: no teacher).
TeacherOutput = ModelOutput | CachedTeacher


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """`(B, T-1)`: True where the logits at position t have a real target, the token at t + 1."""
    return labels[:, 1:] != IGNORE_INDEX


def at_targets(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The rows of `values (B, T, ...)` whose position has a real next-token target, shifted: `(N, ...)`."""
    return values[:, :-1][target_mask(labels)]


def target_ids(labels: torch.Tensor) -> torch.Tensor:
    """The real next-token targets of `labels (B, T)`, in the order of `at_targets`: `(N,)`."""
    return labels[:, 1:][target_mask(labels)]


def next_token_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over real targets. `student_logits (B, T, V)`, `labels (B, T)` -> scalar."""
    logits = student_logits[:, :-1]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def _gather_real_targets(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The shifted logits at the real target positions only: float32 student `(N, V)` and teacher `(N, V)` (cropped
    to the student's vocabulary) and the targets `(N,)`; None when the batch has no target at all."""
    vocab_size = student_logits.size(-1)
    if teacher_logits.size(-1) < vocab_size:
        raise ValueError(
            f"the teacher's vocabulary ({teacher_logits.size(-1)}) is smaller than the student's ({vocab_size})"
        )
    targets = target_ids(labels)
    if targets.numel() == 0:
        return None
    return (
        at_targets(student_logits, labels).float(),
        at_targets(teacher_logits[..., :vocab_size], labels).float(),
        targets,
    )


def _log_softmaxes(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's log-probabilities at temperature 1 (for the CE), and the student's and the teacher's at
    `temperature`; at temperature 1 the first serves twice, which saves a pass over `(N, V)`."""
    student_log_probs = F.log_softmax(student, dim=-1)
    if temperature == 1.0:
        return student_log_probs, student_log_probs, F.log_softmax(teacher, dim=-1)
    return (
        student_log_probs,
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
    )


def _zero_output(student_logits: torch.Tensor) -> LossOutput:
    zero = student_logits.sum() * 0.0  # still part of the graph, like cross_entropy's own result
    return LossOutput(zero, zero, zero)


def kd_and_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    beta: float,
) -> LossOutput:
    """`alpha * KD + beta * CE`: KD is `temperature**2` times the mean over real targets of KL(teacher_T ||
    student_T) over the vocabulary, CE `next_token_cross_entropy`, both computed in one pass.

    `student_logits (B, T, V)`, `teacher_logits (B, T, V')` with V' >= V, `labels (B, T)`. The real target
    positions are gathered once for both terms, and at temperature 1 the student's log-softmax serves both, which
    saves several passes over `(N, V)` tensors (the loss is memory-bound, unlike the matmuls around it). The teacher's
    logits must be finite, as a model's are: masking out zeros would cost passes (`kl_divergence`'s `finite`).
    """
    gathered = _gather_real_targets(student_logits, teacher_logits, labels)
    if gathered is None:
        return _zero_output(student_logits)
    student, teacher, targets = gathered
    student_log_probs, student_log_probs_t, teacher_log_probs_t = _log_softmaxes(student, teacher, temperature)
    kd = temperature**2 * kl_divergence(teacher_log_probs_t, student_log_probs_t, finite=True).mean()
    ce = -student_log_probs.gather(1, targets[:, None]).mean()
    return LossOutput(alpha * kd + beta * ce, kd, ce)


def divergence_and_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    beta: float,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    skew: float = 0.1,
) -> LossOutput:
    """`alpha * KD + beta * CE` with any of `DIVERGENCES` over the vocabulary; same shapes as `kd_and_cross_entropy`
    (which is faster for forward_kl)."""
    check_divergence(divergence, jsd_beta, skew)
    gathered = _gather_real_targets(student_logits, teacher_logits, labels)
    if gathered is None:
        return _zero_output(student_logits)
    student, teacher, targets = gathered
    student_log_probs, student_log_probs_t, teacher_log_probs_t = _log_softmaxes(student, teacher, temperature)
    # The CE's gather before the KD: the order in which autograd sums the gradients that reach the log-softmax.
    ce = -student_log_probs.gather(1, targets[:, None]).squeeze(1).mean()
    kd = temperature**2 * token_divergence(student_log_probs_t, teacher_log_probs_t, divergence, jsd_beta, skew).mean()
    return LossOutput(alpha * kd + beta * ce, kd, ce)


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
    student = at_targets(student_hidden, labels)  # (N, d)
    if student.size(0) == 0:
        return student_hidden.sum() * 0.0  # still part of the graph
    cosine = F.cosine_similarity(student.float(), at_targets(teacher_hidden, labels).float(), dim=-1)
    return (1.0 - cosine).mean()


def cached_teacher_buckets(
    student_logits: torch.Tensor, cached: CachedTeacher, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' distributions over K + 1 outcomes at the real target positions: the teacher's top K tokens,
    then all the others together. `student_logits (B, T, V)`, `cached` as above, `labels (B, T)` -> student and
    teacher log-probabilities `(N, K + 1)`, at temperature 1. Any divergence between these is at most the
    full-vocabulary one (merging outcomes never increases a divergence), and equal when the top K hold the mass."""
    student_log_probs = F.log_softmax(at_targets(student_logits, labels).float(), dim=-1)  # (N, V)
    top_ids = at_targets(cached.top_ids, labels)  # (N, K)
    student_top = student_log_probs.gather(1, top_ids)
    student_rest = student_log_probs.scatter(1, top_ids, float("-inf")).logsumexp(dim=-1, keepdim=True)
    teacher = torch.cat(
        [at_targets(cached.top_log_probs, labels), at_targets(cached.rest_log_prob, labels)[:, None]], -1
    )
    return torch.cat([student_top, student_rest], dim=-1), teacher.float()


def cached_teacher_kd_and_cross_entropy(
    student_logits: torch.Tensor,
    cached: CachedTeacher,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    skew: float = 0.1,
) -> LossOutput:
    """`alpha * KD + beta * CE` against a cached teacher (temperature 1), the KD over the K + 1 outcomes of
    `cached_teacher_buckets`. `student_logits (B, T, V)`, `labels (B, T)`."""
    if not target_mask(labels).any():
        return _zero_output(student_logits)
    student_buckets, teacher_buckets = cached_teacher_buckets(student_logits, cached, labels)
    ce = next_token_cross_entropy(student_logits, labels)
    kd = token_divergence(student_buckets, teacher_buckets, divergence, jsd_beta, skew).mean()
    return LossOutput(alpha * kd + beta * ce, kd, ce)


def agreement_with_teacher(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """`(2,)`: summed over the real target positions, KL(teacher || student) at temperature 1 and the number of
    positions where the two models' most likely next token is the same. `student_logits (B, T, V)`,
    `teacher_logits (B, T, V')` with V' >= V (cropped to V), `labels (B, T)`."""
    gathered = _gather_real_targets(student_logits, teacher_logits, labels)
    if gathered is None:
        return torch.zeros(2, device=student_logits.device)
    student, teacher, _ = gathered
    kl = kl_divergence(F.log_softmax(teacher, dim=-1), F.log_softmax(student, dim=-1), finite=True).sum()
    agreements = (student.argmax(dim=-1) == teacher.argmax(dim=-1)).sum()
    return torch.stack([kl, agreements.float()])


def agreement_with_cached_teacher(
    student_logits: torch.Tensor, cached: CachedTeacher, labels: torch.Tensor
) -> torch.Tensor:
    """As `agreement_with_teacher`, against the cached top-k distributions: the KL is between the two models'
    distributions over the teacher's top k tokens and the rest (a lower bound of the full KL), and the teacher's
    most likely token is the first cached one."""
    student, teacher = cached_teacher_buckets(student_logits, cached, labels)
    kl = kl_divergence(teacher, student).sum()
    top_ids = at_targets(cached.top_ids, labels)
    agreements = (at_targets(student_logits, labels).argmax(dim=-1) == top_ids[:, 0]).sum()
    return torch.stack([kl, agreements.float()])


# --- the criteria: one call shape, `criterion(student, teacher, labels) -> LossOutput` ---------------------------


# The range of each number of DistillationLoss, in the words of its messages.
ARGUMENT_RANGES = {
    "alpha": ">= 0",
    "beta": ">= 0",
    "temperature": "> 0",
    "jsd_beta": "between 0 and 1",
    "skew": "between 0 and 1",
    "hidden_weight": ">= 0",
}


def _number(name: str, value) -> float:
    number = as_number(value)
    if number is None or not math.isfinite(number):  # an infinite weight or temperature makes every loss NaN
        raise ValueError(f"{name} must be a finite number {ARGUMENT_RANGES[name]}, not {value!r}")
    return number


class Criterion(torch.nn.Module):
    """Base class of the configurable criteria (`distillation.settings.config_guard.CRITERIA` lists those a config
    may name; config.yaml's `()` entry builds one, which is the run's criterion).

    Every criterion is called the same way: `criterion(student, teacher, labels) -> LossOutput`, with `student` a
    `ModelOutput`, `teacher` a `ModelOutput`, a `CachedTeacher` or None, and `labels (B, T)`. What it reads of the
    models is declared here once, so the caller decides once what the forward passes return.
    """

    requires_teacher: bool = False

    @property
    def projects_hidden_states(self) -> bool:
        """Whether it reads the last hidden states and the output heads, never `(B, T, V)` logits (see `run_as`)."""
        return False

    @property
    def compares_hidden_states(self) -> bool:
        """Whether a term compares the student's and the teacher's last hidden states (they must be as wide)."""
        return False

    @property
    def reads_hidden_states(self) -> bool:
        """Whether the models' last hidden states must be in their `ModelOutput`."""
        return self.projects_hidden_states or self.compares_hidden_states

    def run_as(self, fused: bool, cached_teacher: bool = False) -> Criterion:
        """Choose how the criterion runs, once, at setup, before the first call (its class, values and name stay):
        `fused`, from the hidden states a chunk at a time where it can (`hardware.fused_loss`); `cached_teacher`,
        against the teacher's cached distributions (`teacher_cache.is_used`). Returns the criterion."""
        return self

    def cached_teacher_refusal(self) -> str | None:
        """Why it cannot run against the teacher's cached distributions (a phrase to fix it), or None."""
        return None

    def without_cross_entropy(self) -> Criterion:
        """The same criterion, run the same way, with its CE term weighted 0 (still computed and reported): what the
        student's own samples are scored with (responses.py)."""
        return self

    def spec(self) -> dict:
        """The configue form that builds this criterion (also part of a run's identity)."""
        return {"()": f"loss.{type(self).__name__}", **self._arguments()}

    def _arguments(self) -> dict:
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self._arguments().items())

    def evaluation_sums(
        self, student: ModelOutput, teacher: TeacherOutput | None, labels: torch.Tensor
    ) -> torch.Tensor:
        """What an evaluation reads of a batch: `(5,)` float32 sums over its real targets of the loss, the KD and
        CE terms, KL(teacher || student) at temperature 1 and the targets where both models' most likely token is
        the same (0 for the terms a criterion does not have)."""
        output = self(student, teacher, labels)
        kd = output.kd if output.kd is not None else torch.zeros_like(output.ce)
        terms = torch.stack([output.loss, kd, output.ce]).float() * target_mask(labels).sum()
        return torch.cat([terms, terms.new_zeros(2)])


class DistillationLoss(Criterion):
    """`alpha * KD + beta * CE + hidden_weight * (1 - cosine of the last hidden states)`, each a mean over real
    targets (see the module docstring); the KD divergence is one of `DIVERGENCES`.

    It runs (`run_as`) from both models' full logits, or from their hidden states and heads a chunk at a time (as
    ChunkedDistillationLoss, the same values), or against the teacher's cached top-k distributions (the KD over the
    K + 1 outcomes of `cached_teacher_buckets`: temperature 1 and no hidden states, which the cache does not hold).
    """

    requires_teacher = True
    FULL_LOGITS, FUSED, CACHED_TEACHER = "full logits", "fused", "cached teacher"

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.1,
        temperature: float = 1.0,
        divergence: str = "forward_kl",
        jsd_beta: float = 0.5,
        skew: float = 0.1,
        hidden_weight: float = 0.0,
    ) -> None:
        super().__init__()
        numbers = {
            name: _number(name, value)
            for name, value in (
                ("alpha", alpha),
                ("beta", beta),
                ("temperature", temperature),
                ("jsd_beta", jsd_beta),
                ("skew", skew),
                ("hidden_weight", hidden_weight),
            )
        }
        _check_weights(**numbers)
        check_divergence(divergence, numbers["jsd_beta"], numbers["skew"])
        self.alpha, self.beta, self.temperature = numbers["alpha"], numbers["beta"], numbers["temperature"]
        self.divergence, self.jsd_beta, self.skew = divergence, numbers["jsd_beta"], numbers["skew"]
        self.hidden_weight = numbers["hidden_weight"]
        self.execution = self.FULL_LOGITS
        self.terms = FusedTerms(self.temperature, self.alpha, self.beta, self.divergence, self.jsd_beta, self.skew)

    @property
    def projects_hidden_states(self) -> bool:
        return self.execution == self.FUSED

    @property
    def compares_hidden_states(self) -> bool:
        return self.hidden_weight > 0

    def run_as(self, fused: bool, cached_teacher: bool = False) -> DistillationLoss:
        if cached_teacher:
            refusal = self.cached_teacher_refusal()
            if refusal is not None:
                raise ValueError(refusal)
        self.execution = self.CACHED_TEACHER if cached_teacher else self.FUSED if fused else self.FULL_LOGITS
        return self

    def without_cross_entropy(self) -> DistillationLoss:
        unweighted = copy.copy(self)  # a shallow copy of a module: the same parameters (it has none) and settings
        unweighted.beta = 0.0
        unweighted.terms = dataclasses.replace(self.terms, beta=0.0)
        return unweighted

    def cached_teacher_refusal(self) -> str | None:
        if self.temperature != 1.0:
            return "the cache holds the teacher's probabilities at temperature 1; set the loss temperature to 1"
        if self.hidden_weight != 0:
            return "the cache holds no hidden states; set the loss's hidden_weight to 0"
        return None

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

    def forward(self, student: ModelOutput, teacher: TeacherOutput | None, labels: torch.Tensor) -> LossOutput:
        self._check_teacher(teacher)
        output = self._kd_and_cross_entropy(student, teacher, labels)
        if self.hidden_weight == 0:
            return output
        hidden = self._hidden_distance(student, teacher, labels)
        return LossOutput(output.loss + self.hidden_weight * hidden, output.kd, output.ce, hidden)

    def evaluation_sums(
        self, student: ModelOutput, teacher: TeacherOutput | None, labels: torch.Tensor
    ) -> torch.Tensor:
        if self.execution != self.FUSED:  # the loss's terms, then the figures from the full logits
            sums = super().evaluation_sums(student, teacher, labels)
            agreement = (
                agreement_with_cached_teacher(student.logits, teacher, labels)
                if self.execution == self.CACHED_TEACHER
                else agreement_with_teacher(student.logits, teacher.logits, labels)
            )
            return torch.cat([sums[:3], agreement.float()])
        self._check_teacher(teacher)
        kd, ce, kl, agreements = fused_figures(*self._fused_arguments(student, teacher, labels), self.terms)
        loss = self.alpha * kd + self.beta * ce
        if self.hidden_weight != 0:
            loss = (
                loss + self.hidden_weight * self._hidden_distance(student, teacher, labels) * target_mask(labels).sum()
            )
        return torch.stack([loss, kd, ce, kl, agreements])

    def _check_teacher(self, teacher: TeacherOutput | None) -> None:
        if teacher is None:
            raise ValueError(f"{type(self).__name__} needs the teacher's output")
        if (self.execution == self.CACHED_TEACHER) != isinstance(teacher, CachedTeacher):
            wanted = "cached distributions (CachedTeacher)" if self.execution == self.CACHED_TEACHER else "ModelOutput"
            raise ValueError(f"{type(self).__name__} run from {self.execution} needs the teacher's {wanted}")
        if self.execution == self.FUSED and (teacher.hidden is None or teacher.head is None):
            raise ValueError(f"{type(self).__name__} needs the teacher's last hidden states and output head")

    def _hidden_distance(self, student: ModelOutput, teacher: ModelOutput, labels: torch.Tensor) -> torch.Tensor:
        if student.hidden is None or teacher.hidden is None:
            raise ValueError(
                f"{type(self).__name__} with hidden_weight > 0 needs the student's and the teacher's last hidden "
                f"states (ModelOutput.hidden)"
            )
        return hidden_cosine_distance(student.hidden, teacher.hidden, labels)

    @staticmethod
    def _fused_arguments(student: ModelOutput, teacher: ModelOutput, labels: torch.Tensor) -> tuple:
        """The fused kernel's rows: both models' hidden states at the real targets, their heads, the targets."""
        return (
            at_targets(student.hidden, labels),
            student.head,
            at_targets(teacher.hidden, labels),
            teacher.head,
            target_ids(labels),
        )

    def _kd_and_cross_entropy(self, student: ModelOutput, teacher: TeacherOutput, labels: torch.Tensor) -> LossOutput:
        if self.execution == self.CACHED_TEACHER:
            return cached_teacher_kd_and_cross_entropy(
                student.logits, teacher, labels, self.alpha, self.beta, self.divergence, self.jsd_beta, self.skew
            )
        if self.execution == self.FUSED:
            return LossOutput(*fused_divergence_ce(*self._fused_arguments(student, teacher, labels), self.terms))
        if self.divergence == "forward_kl":
            return kd_and_cross_entropy(student.logits, teacher.logits, labels, self.temperature, self.alpha, self.beta)
        return divergence_and_cross_entropy(
            student.logits,
            teacher.logits,
            labels,
            self.temperature,
            self.alpha,
            self.beta,
            self.divergence,
            self.jsd_beta,
            self.skew,
        )


def _check_weights(alpha: float, beta: float, temperature: float, hidden_weight: float, **_) -> None:
    for name, weight in (("alpha", alpha), ("beta", beta), ("hidden_weight", hidden_weight)):
        if weight < 0:
            raise ValueError(f"{name} must be >= 0 (got {weight})")
    if alpha == 0 and beta == 0 and hidden_weight == 0:
        raise ValueError(
            "alpha and beta are both 0 and so is hidden_weight, so nothing would be learned; make at least one positive"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature})")


class ClassicLoss(Criterion):
    """Plain next-token training: the loss is the student's cross-entropy, no teacher is used or loaded."""

    def forward(self, student: ModelOutput, teacher: TeacherOutput | None, labels: torch.Tensor) -> LossOutput:
        ce = next_token_cross_entropy(student.logits, labels)
        return LossOutput(ce, None, ce)


class ChunkedDistillationLoss(DistillationLoss):
    """DistillationLoss computed from the last hidden states and output heads a chunk of positions at a time
    (`chunked_loss.py`; the same values and gradients), so that no `(B, T, V)` logits are ever materialised: its
    peak memory is a fraction of the full-logits one, and it is faster. Every divergence and the hidden-state term.
    `loss.DistillationLoss` runs this way by itself unless FSDP shards the output head (`run_as`); naming this
    class forces it, even where FSDP would refuse it, and sets `chunk_size` (positions projected at a time in
    float32; at least chunked_loss.ROWS_PER_PROJECTION in 16 bits)."""

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.1,
        temperature: float = 1.0,
        divergence: str = "forward_kl",
        jsd_beta: float = 0.5,
        skew: float = 0.1,
        hidden_weight: float = 0.0,
        chunk_size: int = 128,
    ) -> None:
        super().__init__(alpha, beta, temperature, divergence, jsd_beta, skew, hidden_weight)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a whole number >= 1 (got {chunk_size!r})")
        self.chunk_size = chunk_size
        self.terms = FusedTerms(
            self.temperature, self.alpha, self.beta, self.divergence, self.jsd_beta, self.skew, self.chunk_size
        )
        self.execution = self.FUSED

    def run_as(self, fused: bool, cached_teacher: bool = False) -> ChunkedDistillationLoss:
        if cached_teacher:
            raise ValueError(self.cached_teacher_refusal())
        return self  # always fused: with FSDP, `hardware.fsdp_plugin` refuses it before this is asked

    def cached_teacher_refusal(self) -> str | None:
        return (
            "loss.ChunkedDistillationLoss reads the teacher's hidden states, which the cache does not hold; use "
            "loss.DistillationLoss"
        )

    def _arguments(self) -> dict:
        return {**super()._arguments(), "chunk_size": self.chunk_size}
