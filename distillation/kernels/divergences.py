"""Divergences between a teacher's distribution p and a student's q, given as log-probabilities over the same K
outcomes (the vocabulary, or buckets such as a cached teacher's top-k tokens and the rest), row by row.

Exact zeros (-inf log-probabilities) give neither NaN values nor NaN gradients. The KD term that `loss.py` builds
from these (temperature, `T**2`, the mean over real targets) is defined there.
"""

from __future__ import annotations

import math

import torch

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


def check_divergence(divergence: str, jsd_beta: float = 0.5, skew: float = 0.1) -> None:
    """Raise ValueError unless `divergence` is one of `DIVERGENCES` and `jsd_beta` and `skew` lie in [0, 1]."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; use one of {', '.join(DIVERGENCES)}")
    for name, value in (("jsd_beta", jsd_beta), ("skew", skew)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1 (got {value})")


def kl_divergence(
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    finite: bool = False,
    probs_a: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row KL(a || b) = sum of a (log a - log b), from `(N, K)` log-probabilities -> `(N,)`: the one
    implementation of the KL divergence, which every KL-type term of the project (training, the fused kernel,
    evaluation) computes through.

    With 0 log 0 = 0; where b is exactly 0 but a is not, the KL is infinite and its gradient NaN, so such a b counts
    as the smallest normal probability of the dtype instead, and a teacher with zeros still trains a reverse KL.
    `finite`: the caller knows that no log-probability is -inf (log-softmaxes of finite logits are never -inf), which
    saves the masking passes over `(N, K)`. `probs_a`: a's probabilities, when the caller has them already. `out`: an
    `(N, K)` float tensor the terms are computed in, for a caller that reuses its memory (values only, no autograd).
    """
    if finite:
        difference = log_a - log_b if out is None else torch.sub(log_a, log_b, out=out)
    else:
        in_support = log_a > float("-inf")
        log_b = torch.where(torch.isneginf(log_b), math.log(torch.finfo(log_b.dtype).tiny), log_b)
        # Masking the difference, not the product, keeps 0 * inf out of the backward pass too.
        difference = torch.where(in_support, log_a - log_b, 0.0)
    probs_a = log_a.exp() if probs_a is None else probs_a
    terms = probs_a * difference if out is None else torch.mul(probs_a, difference, out=out)
    return terms.sum(dim=-1)


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float, finite: bool = False) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b) from log-probabilities, in log space for stability."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    if finite:
        return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)
    # logaddexp's gradient is NaN where both inputs are -inf, even when unused: give it finite stand-ins there.
    log_a = torch.where(both_zero, 0.0, log_a)
    log_b = torch.where(both_zero, 0.0, log_b)
    mixture = torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))
    return torch.where(both_zero, float("-inf"), mixture)


def token_divergence(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    divergence: str,
    jsd_beta: float = 0.5,
    skew: float = 0.1,
    finite: bool = False,
) -> torch.Tensor:
    """Per-row divergence between the teacher's distribution p and the student's q, see `DIVERGENCES`.

    `student_log_probs (N, K)` and `teacher_log_probs (N, K)` are log-probabilities over the same K outcomes
    (the vocabulary or any other bucketing) -> `(N,)`. Exact zeros (-inf) give neither NaN values nor NaN gradients;
    `finite`: the caller knows there are none (see `kl_divergence`), which saves the passes that mask them.
    """
    check_divergence(divergence, jsd_beta, skew)
    if student_log_probs.shape != teacher_log_probs.shape:
        raise ValueError(
            f"the student's and the teacher's log-probabilities differ in shape "
            f"({tuple(student_log_probs.shape)} and {tuple(teacher_log_probs.shape)})"
        )
    log_p, log_q = teacher_log_probs, student_log_probs

    def kl(log_a, log_b):
        return kl_divergence(log_a, log_b, finite)

    if divergence == "forward_kl" or (divergence == "jsd" and jsd_beta == 0.0):
        return kl(log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and jsd_beta == 1.0):
        return kl(log_q, log_p)
    if divergence == "jsd":
        log_m = _log_mixture(log_p, log_q, jsd_beta, finite)
        return jsd_beta * kl(log_p, log_m) + (1.0 - jsd_beta) * kl(log_q, log_m)
    if divergence == "skew_kl":
        return kl(log_p, _log_mixture(log_p, log_q, skew, finite))
    if divergence == "skew_reverse_kl":
        return kl(log_q, _log_mixture(log_q, log_p, skew, finite))
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)  # tv
