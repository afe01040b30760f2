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

import torch
import torch.nn.functional as F

from distillation.kernels.divergences import kl_divergence, token_divergence


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

    @property
    def is_reverse_kl(self) -> bool:
        """Reverse KL (jsd with jsd_beta 1 is the same), the on-policy default, has one too (`_reverse_kl_rows`)."""
        return self.divergence == "reverse_kl" or (self.divergence == "jsd" and self.jsd_beta == 1.0)


# Rows of a chunk that the float32 softmaxes handle at a time: their few (16, V) float32 tensors stay in the cache
# (3 MiB each at V = 50257), where whole-chunk float32 tensors made a dozen passes over memory and spent a fifth of
# the step there.
ROWS_AT_ONCE = 16


class _Scratch:
    """Float32 `(ROWS_AT_ONCE, V)` tensors, allocated once per loss call and reused for every block of rows."""

    def __init__(self, vocabulary: int, device: torch.device, count: int) -> None:
        self.tensors = [torch.empty(ROWS_AT_ONCE, vocabulary, device=device) for _ in range(count)]

    def take(self, rows: int) -> list[torch.Tensor]:
        return [tensor[:rows] for tensor in self.tensors]


def _log_softmaxes_into(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    log_probs: torch.Tensor,
    student_log_probs_t: torch.Tensor,
    teacher_log_probs_t: torch.Tensor,
) -> torch.Tensor:
    """Into float32 scratch rows `(R, V)`: the student's log-probabilities at temperature 1 (`log_probs`, for the
    CE) and the teacher's at `temperature` (`teacher_log_probs_t`); returns the student's at `temperature`, which is
    `log_probs` itself at temperature 1 (one log-softmax serves both terms), else `student_log_probs_t`."""
    torch.log_softmax(student_logits, dim=-1, dtype=torch.float32, out=log_probs)
    if temperature == 1.0:
        torch.log_softmax(teacher_logits, dim=-1, dtype=torch.float32, out=teacher_log_probs_t)
        return log_probs
    torch.log_softmax(student_log_probs_t.copy_(student_logits).div_(temperature), dim=-1, out=student_log_probs_t)
    torch.log_softmax(teacher_log_probs_t.copy_(teacher_logits).div_(temperature), dim=-1, out=teacher_log_probs_t)
    return student_log_probs_t


def _forward_kl_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    terms: FusedTerms,
    count: int,
    gradient_out: torch.Tensor | None,
    scratch: _Scratch,
):
    """(KL sum, CE sum) of at most ROWS_AT_ONCE rows of logits `(R, V)` in the compute dtype, and the gradient of the
    objective with respect to those logits written into `gradient_out` `(R, V)` when given."""
    temperature, alpha, beta = terms.temperature, terms.alpha, terms.beta
    log_probs, teacher_log_probs_t, teacher_probs_t, student_log_probs_t = scratch.take(student_logits.size(0))
    student_log_probs_t = _log_softmaxes_into(
        student_logits, teacher_logits, temperature, log_probs, student_log_probs_t, teacher_log_probs_t
    )
    torch.exp(teacher_log_probs_t, out=teacher_probs_t)
    # Computed in the teacher's log-probabilities, which the gradient does not read: no (R, V) tensor to allocate.
    kd_sum = kl_divergence(
        teacher_log_probs_t, student_log_probs_t, finite=True, probs_a=teacher_probs_t, out=teacher_log_probs_t
    ).sum()
    ce_sum = -log_probs.gather(1, targets[:, None]).sum()
    if gradient_out is None:
        return kd_sum, ce_sum
    # d(T**2 KL)/ds = T (softmax(s / T) - softmax(t / T)); d CE/ds = softmax(s) - onehot; all over the count. The
    # last operation writes the compute dtype: no float32 pass of its own for the cast.
    rows = torch.arange(targets.numel(), device=targets.device)
    if temperature == 1.0:
        scaled = log_probs.exp_().mul_((alpha + beta) / count)
    else:
        scaled = student_log_probs_t.exp_().mul_(alpha * temperature / count)
        scaled.add_(log_probs.exp_(), alpha=beta / count)
    scaled[rows, targets] -= beta / count
    torch.add(scaled, teacher_probs_t, alpha=-alpha * temperature / count, out=gradient_out)
    return kd_sum, ce_sum


def _reverse_kl_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    terms: FusedTerms,
    count: int,
    gradient_out: torch.Tensor | None,
    scratch: _Scratch,
):
    """As `_forward_kl_rows` for the reverse KL(q || p): with q and p the student's and the teacher's distributions
    at temperature T, d(T**2 KL)/ds = T q (log q - log p - KL), row by row; d CE/ds = softmax(s) - onehot. The
    log-softmaxes of finite logits are finite, so no term needs masking (as `kl_divergence(finite=True)`)."""
    temperature, alpha, beta = terms.temperature, terms.alpha, terms.beta
    log_probs, teacher_log_probs_t, student_probs_t, student_log_probs_t = scratch.take(student_logits.size(0))
    student_log_probs_t = _log_softmaxes_into(
        student_logits, teacher_logits, temperature, log_probs, student_log_probs_t, teacher_log_probs_t
    )
    torch.exp(student_log_probs_t, out=student_probs_t)
    # log q - log p, in the teacher's buffer; each row's KL is its dot product with q (no (R, V) product tensor).
    gap = torch.sub(student_log_probs_t, teacher_log_probs_t, out=teacher_log_probs_t)
    kd_rows = torch.bmm(student_probs_t.unsqueeze(1), gap.unsqueeze(2)).view(-1)
    kd_sum = kd_rows.sum()
    ce_sum = -log_probs.gather(1, targets[:, None]).sum()
    if gradient_out is None:
        return kd_sum, ce_sum
    scaled = gap.sub_(kd_rows[:, None]).mul_(student_probs_t).mul_(alpha * temperature / count)
    if beta != 0.0:
        scaled.add_(student_probs_t if temperature == 1.0 else log_probs.exp_(), alpha=beta / count)
        scaled[torch.arange(targets.numel(), device=targets.device), targets] -= beta / count
    gradient_out.copy_(scaled)
    return kd_sum, ce_sum


def _any_divergence_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    terms: FusedTerms,
    count: int,
    gradient_out: torch.Tensor | None,
    scratch: _Scratch,
):
    """As `_forward_kl_rows` for any divergence, by autograd over these rows' logits only: the divergence is
    `divergences.token_divergence`, the very function of the full-logits loss."""
    temperature, wants_gradient = terms.temperature, gradient_out is not None
    student_logits_32, teacher_logits_32 = (
        tensor.copy_(logits)
        for tensor, logits in zip(scratch.take(student_logits.size(0)), (student_logits, teacher_logits))
    )
    with torch.enable_grad() if wants_gradient else contextlib.nullcontext():
        logits = student_logits_32.requires_grad_(wants_gradient)
        log_probs = F.log_softmax(logits, dim=-1)
        student_log_probs_t = log_probs if temperature == 1.0 else F.log_softmax(logits / temperature, dim=-1)
        teacher_log_probs_t = F.log_softmax(teacher_logits_32 / temperature, dim=-1)
        kd_sum = token_divergence(
            student_log_probs_t, teacher_log_probs_t, terms.divergence, terms.jsd_beta, terms.skew
        ).sum()
        ce_sum = -log_probs.gather(1, targets[:, None]).sum()
        if not wants_gradient:
            return kd_sum, ce_sum
        objective = (terms.alpha * temperature**2 * kd_sum + terms.beta * ce_sum) / count
        (gradient,) = torch.autograd.grad(objective, logits)
    gradient_out.copy_(gradient)
    return kd_sum.detach(), ce_sum.detach()


class FusedDivergenceCE(torch.autograd.Function):
    """KD + CE from hidden states, projecting to the vocabulary a chunk of positions at a time.

    The gradients with respect to the student's hidden states and head are computed in the forward pass, chunk by
    chunk, from the gradient with respect to each chunk's logits; so no `(N, V)` tensor outlives its chunk, and
    backward only scales the stored gradients.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden,
        student_head,
        teacher_hidden,
        teacher_head,
        targets,
        terms: FusedTerms,
        compute_dtype: torch.dtype,
    ):
        count = max(targets.numel(), 1)  # no target: both terms are 0
        wants_gradient = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]  # not during evaluation
        # Cast once, not per chunk: a (V, d) copy each.
        heads = student_head.to(compute_dtype), teacher_head[: student_head.size(0)].to(compute_dtype)
        # Every row is written by its group.
        hidden_gradient = torch.empty_like(student_hidden, dtype=torch.float32) if wants_gradient else None
        # The head's gradient is the first group's product, then the sum: no (V, d) zeros to write and add.
        no_target = wants_gradient and targets.numel() == 0
        head_gradient = torch.zeros_like(student_head, dtype=torch.float32) if no_target else None
        kd_total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        ce_total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        workspace = _Workspace(targets.numel(), heads, terms, wants_gradient)
        group_rows = _group_rows(terms.chunk_size, compute_dtype)
        for start in range(0, targets.numel(), group_rows):
            group = slice(start, start + group_rows)
            hidden_gradient_rows = hidden_gradient[group] if wants_gradient else None
            kd_sum, ce_sum, head_gradient = _project_group(
                student_hidden[group],
                teacher_hidden[group],
                targets[group],
                heads,
                terms,
                count,
                hidden_gradient_rows,
                head_gradient,
                workspace,
            )
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
        return (
            hidden_gradient.mul_(loss_gradient).to(hidden_dtype),
            head_gradient.mul_(loss_gradient).to(head_dtype),
            None,
            None,
            None,
            None,
            None,
        )


# In 16 bits, rows whose logits gradients are kept for one product with the head: (rows, V) 16-bit values, 200 MiB
# at V = 50257. A float32 (V, d) head gradient cannot be accumulated in place from 16-bit operands (CPUs have no
# mixed-dtype addmm), and converting and adding it once per chunk cost more than the products themselves.
ROWS_PER_HEAD_PRODUCT = 2048
# In 16 bits, rows projected at a time, at least: a (512, d) @ (d, V) bf16 product ran at 1.03 TFLOP/s on an AMX
# CPU against 0.72 for 128 rows, and the (rows, V) logits stay 16-bit (50 MiB each at V = 50257).
ROWS_PER_PROJECTION = 512


def _chunk_rows(chunk_size: int, compute_dtype: torch.dtype) -> int:
    """Positions projected at a time: the chunk size in float32, at least ROWS_PER_PROJECTION in 16 bits."""
    return chunk_size if compute_dtype == torch.float32 else max(chunk_size, ROWS_PER_PROJECTION)


def _group_rows(chunk_size: int, compute_dtype: torch.dtype) -> int:
    """Positions projected chunk by chunk and multiplied by the head once: one chunk in float32 (the product
    accumulates in place), several in 16 bits."""
    return chunk_size if compute_dtype == torch.float32 else max(chunk_size, ROWS_PER_HEAD_PRODUCT)


class _Workspace:
    """What one loss call reuses for every chunk: the chunk's logits `(C, V)` in the compute dtype (the products
    write there), the group's logits gradient `(G, V)` in the compute dtype, and the float32 scratch rows."""

    def __init__(
        self, targets: int, heads: tuple[torch.Tensor, torch.Tensor], terms: FusedTerms, wants_gradient: bool
    ) -> None:
        student_head = heads[0]
        vocabulary, dtype, device = student_head.size(0), student_head.dtype, student_head.device
        rows = min(targets, _chunk_rows(terms.chunk_size, dtype))
        self.student_logits, self.teacher_logits = (
            torch.empty(rows, vocabulary, dtype=dtype, device=device) for _ in range(2)
        )
        group_rows = min(targets, _group_rows(terms.chunk_size, dtype))
        self.logits_gradient = (
            torch.empty(group_rows, vocabulary, dtype=dtype, device=device) if wants_gradient else None
        )
        self.scratch = _Scratch(vocabulary, device, count=4)


def _chunk_sums(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    terms: FusedTerms,
    count: int,
    logits_gradient: torch.Tensor | None,
    scratch: _Scratch,
):
    """The KD and CE sums of a chunk's logits `(C, V)`, ROWS_AT_ONCE rows at a time; with `logits_gradient` (the
    chunk's `(C, V)` rows of it), the gradient of the objective with respect to the logits is written there."""
    row_sums = (
        _forward_kl_rows if terms.has_closed_form else _reverse_kl_rows if terms.is_reverse_kl else _any_divergence_rows
    )
    kd_total = ce_total = 0.0
    for start in range(0, targets.numel(), ROWS_AT_ONCE):
        rows = slice(start, start + ROWS_AT_ONCE)
        gradient_out = None if logits_gradient is None else logits_gradient[rows]
        kd_sum, ce_sum = row_sums(
            student_logits[rows], teacher_logits[rows], targets[rows], terms, count, gradient_out, scratch
        )
        kd_total, ce_total = kd_total + kd_sum, ce_total + ce_sum
    return kd_total, ce_total


def _project_group(
    student_hidden,
    teacher_hidden,
    targets,
    heads,
    terms: FusedTerms,
    count: int,
    hidden_gradient_rows: torch.Tensor | None,
    head_gradient: torch.Tensor | None,
    workspace: _Workspace,
):
    """The KD and CE sums of a group of G positions (`(G, d)` hidden states) and the head's float32 gradient so far
    (None before the first group); with `hidden_gradient_rows` (the group's `(G, d)` rows of the hidden states'
    float32 gradient), the group's gradients are written there and added to the head's."""
    student_head, teacher_head = heads
    hidden, teacher_hidden = student_hidden.to(student_head.dtype), teacher_hidden.to(teacher_head.dtype)
    wants_gradient = hidden_gradient_rows is not None
    logits_gradient = workspace.logits_gradient[: targets.numel()] if wants_gradient else None  # (G, V)
    kd_total = ce_total = 0.0
    chunk_rows = _chunk_rows(terms.chunk_size, student_head.dtype)
    for start in range(0, targets.numel(), chunk_rows):
        rows = slice(start, start + chunk_rows)
        chunk = targets[rows].numel()
        student_logits = torch.mm(hidden[rows], student_head.T, out=workspace.student_logits[:chunk])
        teacher_logits = torch.mm(teacher_hidden[rows], teacher_head.T, out=workspace.teacher_logits[:chunk])
        kd_sum, ce_sum = _chunk_sums(
            student_logits,
            teacher_logits,
            targets[rows],
            terms,
            count,
            None if logits_gradient is None else logits_gradient[rows],
            workspace.scratch,
        )
        kd_total, ce_total = kd_total + kd_sum, ce_total + ce_sum
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


def _compute_dtype(device_type: str, compute_dtype: torch.dtype | None) -> torch.dtype:
    """`compute_dtype`, by default the autocast dtype where autocast is on at the call, else float32."""
    if compute_dtype is not None:
        return compute_dtype
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32


def fused_divergence_ce(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    targets: torch.Tensor,
    terms: FusedTerms,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(alpha * KD + beta * CE, KD, CE)` of `student_hidden (N, d) @ student_head (V, d).T` against
    `teacher_hidden (N, d') @ teacher_head (V', d').T` with the targets `(N,)`; differentiable in the student's
    hidden states and head. The projections run in `compute_dtype`; by default the autocast dtype where autocast is
    on at the call, else float32."""
    device_type = student_hidden.device.type
    compute_dtype = _compute_dtype(device_type, compute_dtype)
    with torch.autocast(device_type, enabled=False):  # the casts are explicit here
        return FusedDivergenceCE.apply(
            student_hidden, student_head, teacher_hidden, teacher_head, targets, terms, compute_dtype
        )


# --- evaluation: the same projections, values only -------------------------------------------------------------

# What `fused_figures` sums over the rows, in this order.
FIGURES = ("kd", "ce", "kl_teacher", "top1_agreement")


def _figure_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    terms: FusedTerms,
    scratch: _Scratch,
) -> torch.Tensor:
    """`FIGURES` summed over at most ROWS_AT_ONCE rows of logits `(R, V)` in the compute dtype."""
    temperature = terms.temperature
    log_probs, teacher_log_probs, student_log_probs_t, teacher_log_probs_t = scratch.take(student_logits.size(0))
    torch.log_softmax(student_logits, dim=-1, dtype=torch.float32, out=log_probs)
    torch.log_softmax(teacher_logits, dim=-1, dtype=torch.float32, out=teacher_log_probs)
    ce_sum = -log_probs.gather(1, targets[:, None]).sum()
    agreements = (student_logits.argmax(dim=-1) == teacher_logits.argmax(dim=-1)).sum()
    if temperature == 1.0:
        student_log_probs_t, teacher_log_probs_t = log_probs, teacher_log_probs
    else:
        torch.log_softmax(student_log_probs_t.copy_(student_logits).div_(temperature), dim=-1, out=student_log_probs_t)
        torch.log_softmax(teacher_log_probs_t.copy_(teacher_logits).div_(temperature), dim=-1, out=teacher_log_probs_t)
    divergence_sum = token_divergence(
        student_log_probs_t, teacher_log_probs_t, terms.divergence, terms.jsd_beta, terms.skew, finite=True
    ).sum()
    if terms.has_closed_form and temperature == 1.0:
        kl_sum = divergence_sum  # the KD divergence is the KL at T = 1 itself
    else:
        kl_sum = kl_divergence(teacher_log_probs, log_probs, finite=True).sum()
    return torch.stack([temperature**2 * divergence_sum, ce_sum, kl_sum, agreements.float()])


@torch.no_grad()
def fused_figures(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    targets: torch.Tensor,
    terms: FusedTerms,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """What an evaluation reads of a batch, projected as `fused_divergence_ce` projects it (same shapes, same
    precision), a chunk of positions at a time: `(len(FIGURES),)` float32 sums over the N rows of the KD term
    (`T**2` times the divergence), the CE, KL(teacher || student) at temperature 1 and the rows where both models'
    most likely token is the same, the teacher cropped to the student's V tokens."""
    device_type = student_hidden.device.type
    compute_dtype = _compute_dtype(device_type, compute_dtype)
    totals = torch.zeros(len(FIGURES), dtype=torch.float32, device=student_hidden.device)
    with torch.autocast(device_type, enabled=False):
        student_head, teacher_head = (
            student_head.to(compute_dtype),
            teacher_head[: student_head.size(0)].to(compute_dtype),
        )
        hidden, teacher_hidden = student_hidden.to(compute_dtype), teacher_hidden.to(compute_dtype)
        workspace = _Workspace(targets.numel(), (student_head, teacher_head), terms, wants_gradient=False)
        chunk_rows = _chunk_rows(terms.chunk_size, compute_dtype)
        for start in range(0, targets.numel(), chunk_rows):
            rows = slice(start, start + chunk_rows)
            chunk = targets[rows].numel()
            student_logits = torch.mm(hidden[rows], student_head.T, out=workspace.student_logits[:chunk])
            teacher_logits = torch.mm(teacher_hidden[rows], teacher_head.T, out=workspace.teacher_logits[:chunk])
            for block in range(0, chunk, ROWS_AT_ONCE):
                block_rows = slice(block, block + ROWS_AT_ONCE)
                totals += _figure_rows(
                    student_logits[block_rows],
                    teacher_logits[block_rows],
                    targets[rows][block_rows],
                    terms,
                    workspace.scratch,
                )
    return totals


@torch.no_grad()
def fused_cross_entropy_sum(
    hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The CE of `hidden (N, d) @ head (V, d).T` against the targets `(N,)`, summed over the rows (float32), a
    chunk of positions at a time, projected as `fused_divergence_ce` projects (its precision, its chunks)."""
    device_type = hidden.device.type
    compute_dtype = _compute_dtype(device_type, compute_dtype)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    with torch.autocast(device_type, enabled=False):
        head, hidden = head.to(compute_dtype), hidden.to(compute_dtype)
        chunk_rows = _chunk_rows(FusedTerms.chunk_size, compute_dtype)
        logits_rows = torch.empty(
            min(targets.numel(), chunk_rows), head.size(0), dtype=compute_dtype, device=hidden.device
        )
        (log_probs,) = _Scratch(head.size(0), hidden.device, count=1).tensors
        for start in range(0, targets.numel(), chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = torch.mm(hidden[rows], head.T, out=logits_rows[: targets[rows].numel()])
            for block in range(0, logits.size(0), ROWS_AT_ONCE):
                block_rows = slice(block, block + ROWS_AT_ONCE)
                block_log_probs = log_probs[: logits[block_rows].size(0)]
                torch.log_softmax(logits[block_rows], dim=-1, dtype=torch.float32, out=block_log_probs)
                total -= block_log_probs.gather(1, targets[rows][block_rows, None]).sum()
    return total
