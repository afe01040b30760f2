"""The chunked KD + CE kernel behind `loss.ChunkedDistillationLoss`: the full-vocabulary loss of
`hidden @ head.T`, projected a chunk of positions at a time, so that no `(N, V)` tensor outlives its chunk.

Shapes: N real target positions (already gathered), d and d' hidden widths, V student and V' >= V teacher
vocabularies. The normalisation is `loss.py`'s: `T**2` times the mean KL over targets, the mean CE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ChunkedKDCE(torch.autograd.Function):
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


def chunked_kd_ce(student_hidden: torch.Tensor, student_head: torch.Tensor, teacher_hidden: torch.Tensor,
                  teacher_head: torch.Tensor, targets: torch.Tensor, temperature: float, alpha: float, beta: float,
                  chunk_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(alpha * KD + beta * CE, KD, CE)` of `student_hidden (N, d) @ student_head (V, d).T` against
    `teacher_hidden (N, d') @ teacher_head (V', d').T` with the targets `(N,)`; differentiable in the student's
    hidden states and head."""
    return ChunkedKDCE.apply(student_hidden, student_head, teacher_hidden, teacher_head, targets,
                             float(temperature), float(alpha), float(beta), chunk_size)
