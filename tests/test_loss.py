"""The criteria against independent formulas, hand-computed cases, and padding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import loss
from distillation.data import batching
from distillation.kernels import chunked_loss
from distillation.kernels.divergences import DIVERGENCES, token_divergence
from loss import (
    IGNORE_INDEX,
    ChunkedDistillationLoss,
    ClassicLoss,
    DistillationLoss,
    LossOutput,
    ModelOutput,
    divergence_and_cross_entropy,
    kd_and_cross_entropy,
    next_token_cross_entropy,
)


def random_batch(seed: int = 0, batch: int = 3, length: int = 7, vocab: int = 11, extra_teacher_vocab: int = 0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocab, generator=generator)
    teacher = torch.randn(batch, length, vocab + extra_teacher_vocab, generator=generator)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[0, 5:] = IGNORE_INDEX  # a padded row
    labels[1, :3] = IGNORE_INDEX  # a masked prompt
    return student, teacher, labels


def kd_term(student, teacher, labels, temperature):
    """The KD term of the one-pass loss alone (alpha 1, beta 0)."""
    return kd_and_cross_entropy(student, teacher, labels, temperature, alpha=1.0, beta=0.0).kd


def reference_kd(student, teacher, labels, temperature):
    """KD by F.kl_div, summed over the vocabulary, averaged over target positions, one position at a time."""
    values = []
    for row in range(labels.size(0)):
        for position in range(labels.size(1) - 1):
            if labels[row, position + 1] == IGNORE_INDEX:
                continue
            student_log_probs = F.log_softmax(student[row, position] / temperature, dim=-1)
            teacher_log_probs = F.log_softmax(teacher[row, position, : student.size(-1)] / temperature, dim=-1)
            values.append(F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum"))
    return temperature**2 * torch.stack(values).mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kd_matches_kl_div_reference(temperature):
    student, teacher, labels = random_batch()
    expected = reference_kd(student, teacher, labels, temperature)
    assert torch.allclose(kd_term(student, teacher, labels, temperature), expected, atol=1e-6)


def test_kd_hand_computed_two_token_vocabulary():
    # One target; at position 0 the teacher's probabilities are (0.8, 0.2) and the student's (0.5, 0.5).
    teacher = torch.tensor([[[math.log(0.8), math.log(0.2)], [0.0, 0.0]]])
    student = torch.zeros(1, 2, 2)
    labels = torch.tensor([[1, 0]])
    expected = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert kd_term(student, teacher, labels, 1.0).item() == pytest.approx(expected, abs=1e-6)


def test_kd_of_identical_distributions_is_zero_and_positive_otherwise():
    student, teacher, labels = random_batch()
    assert kd_term(student, student.clone(), labels, 1.5).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_term(student, teacher, labels, 1.5).item() > 0.01


def test_ce_matches_cross_entropy_on_shifted_targets():
    student, _, labels = random_batch()
    logits = student[:, :-1].reshape(-1, student.size(-1))
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    expected = F.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(next_token_cross_entropy(student, labels), expected, atol=1e-6)


def test_ce_hand_computed():
    # Uniform logits over 4 tokens: every target costs log(4).
    labels = torch.tensor([[2, 3, IGNORE_INDEX]])
    assert next_token_cross_entropy(torch.zeros(1, 3, 4), labels).item() == pytest.approx(math.log(4), abs=1e-6)


def test_distillation_loss_combines_terms_with_alpha_and_beta():
    student, teacher, labels = random_batch(seed=1)
    criterion = DistillationLoss(alpha=0.7, beta=0.3, temperature=2.0)
    output = criterion(ModelOutput(student), ModelOutput(teacher), labels)
    assert torch.allclose(output.kd, reference_kd(student, teacher, labels, 2.0), atol=1e-6)
    assert torch.allclose(output.ce, next_token_cross_entropy(student, labels))
    assert torch.allclose(output.loss, 0.7 * output.kd + 0.3 * output.ce)


def test_teacher_extra_tokens_are_cropped_to_the_student_vocabulary():
    student, teacher, labels = random_batch(seed=2, extra_teacher_vocab=3)
    cropped = DistillationLoss(temperature=1.0)(
        ModelOutput(student), ModelOutput(teacher[..., :-3].contiguous()), labels
    )
    full = DistillationLoss(temperature=1.0)(ModelOutput(student), ModelOutput(teacher), labels)
    assert torch.allclose(cropped.kd, full.kd)
    # The extra columns really are ignored, not renormalised in: changing them changes nothing.
    teacher[..., -3:] += 100.0
    assert torch.allclose(
        DistillationLoss(temperature=1.0)(ModelOutput(student), ModelOutput(teacher), labels).kd, full.kd
    )


def test_teacher_smaller_than_student_is_refused():
    student, teacher, labels = random_batch()
    with pytest.raises(ValueError, match="vocabulary"):
        kd_term(student, teacher[..., :-1], labels, 1.0)


def test_classic_loss_is_cross_entropy_without_teacher():
    student, _, labels = random_batch(seed=4)
    output = ClassicLoss()(ModelOutput(student), None, labels)
    assert output.kd is None
    assert torch.equal(output.loss, output.ce)
    assert torch.allclose(output.ce, next_token_cross_entropy(student, labels))


def test_gradients_flow_to_the_student_only_through_real_targets():
    student, teacher, labels = random_batch(seed=5)
    student.requires_grad_(True)
    DistillationLoss(alpha=1.0, beta=1.0, temperature=2.0)(
        ModelOutput(student), ModelOutput(teacher), labels
    ).loss.backward()
    # Logits at position t predict t + 1: where t + 1 is not a target (and at the last position) no gradient.
    not_predicting = torch.ones_like(labels, dtype=torch.bool)
    not_predicting[:, :-1] = labels[:, 1:] == IGNORE_INDEX
    assert student.grad[not_predicting].abs().max().item() == 0.0
    assert student.grad[~not_predicting].abs().sum().item() > 0.0


def test_same_samples_padded_differently_give_the_same_loss(tokenizer, teacher_dir):
    """Model + collator + loss: extra padding columns and another batch-mate change nothing."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(teacher.config).eval()
    texts = ["Add 2 and 3.", "Sort these words: pear, apple, fig, and then list them again please."]
    samples = [
        {"input_ids": tokenizer(text)["input_ids"] + [tokenizer.eos_token_id], "prompt_length": 0} for text in texts
    ]
    collate = batching.PaddingCollator(tokenizer.pad_token_id)
    criterion = DistillationLoss(alpha=1.0, beta=0.5, temperature=2.0)

    def loss_of(batch):
        with torch.no_grad():
            student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return criterion(ModelOutput(student_logits), ModelOutput(teacher_logits), batch["labels"])

    tight = collate(samples)
    loose = collate(samples + [{"input_ids": [5] * (tight["input_ids"].size(1) + 9), "prompt_length": 0}])
    loose = {key: value[:2] if torch.is_tensor(value) else value for key, value in loose.items()}
    assert loose["input_ids"].size(1) > tight["input_ids"].size(1)
    short_alone = collate(samples[:1])
    first, second, alone = loss_of(tight), loss_of(loose), loss_of(short_alone)
    for term in ("loss", "kd", "ce"):
        assert getattr(first, term).item() == pytest.approx(getattr(second, term).item(), abs=1e-5)
    # The short sample alone differs (its tokens weigh differently), which shows the test can tell.
    assert abs(alone.loss.item() - first.loss.item()) > 1e-4


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"temperature": 0}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"alpha": 0, "beta": 0}, "both 0"),
        ({"alpha": -1}, ">= 0"),
        ({"alpha": "high"}, "number"),
        ({"divergence": "kl"}, "unknown divergence 'kl'; use one of forward_kl, reverse_kl, jsd"),
        ({"divergence": "jsd", "jsd_beta": 1.5}, "jsd_beta must be between 0 and 1"),
        ({"divergence": "skew_kl", "skew": -0.1}, "skew must be between 0 and 1"),
        ({"hidden_weight": -1}, "hidden_weight must be >= 0"),
        ({"alpha": 0, "beta": 0, "hidden_weight": 0}, "both 0 and so is hidden_weight"),
        ({"skew": "much"}, "number"),
    ],
)
def test_invalid_distillation_arguments_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        DistillationLoss(**arguments)


def test_numeric_strings_are_accepted_as_yaml_1_1_reads_them():
    assert DistillationLoss(alpha="1e-1", beta="5e-1", temperature="2").spec() == {
        "()": "loss.DistillationLoss",
        "alpha": 0.1,
        "beta": 0.5,
        "temperature": 2.0,
    }


def hidden_state_case(seed: int = 7, teacher_width: int = 24, length: int = 9):
    """Hidden states and heads of two models (of different widths by default), the teacher with 3 extra tokens; a
    padded row and a masked prompt."""
    generator = torch.Generator().manual_seed(seed)
    batch, width, vocab = 3, 16, 50
    student_hidden = torch.randn(batch, length, width, generator=generator, requires_grad=True)
    student_head = torch.randn(vocab, width, generator=generator, requires_grad=True)
    teacher_hidden = torch.randn(batch, length, teacher_width, generator=generator)
    teacher_head = torch.randn(vocab + 3, teacher_width, generator=generator)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[0, 6:] = IGNORE_INDEX
    labels[2, :4] = IGNORE_INDEX
    return student_hidden, student_head, teacher_hidden, teacher_head, labels


FUSED_CASES = {
    **{divergence: {"divergence": divergence} for divergence in DIVERGENCES},
    "jsd 0.2 at T 2": {"divergence": "jsd", "jsd_beta": 0.2, "temperature": 2.0},
    "skew_reverse_kl 0.3": {"divergence": "skew_reverse_kl", "skew": 0.3},
    "forward_kl at T 2": {"temperature": 2.0},
    "reverse_kl at T 2": {"divergence": "reverse_kl", "temperature": 2.0},
    "jsd 1 (reverse KL) at T 3 without CE": {"divergence": "jsd", "jsd_beta": 1.0, "temperature": 3.0, "beta": 0.0},
    "tv at T 3 with hidden states": {"divergence": "tv", "temperature": 3.0, "hidden_weight": 0.5},
    "forward_kl with hidden states": {"hidden_weight": 2.0},
}


@pytest.mark.parametrize("arguments", FUSED_CASES.values(), ids=FUSED_CASES.keys())
def test_the_fused_loss_matches_the_full_logits_loss_in_value_and_gradient(arguments):
    student_hidden, student_head, teacher_hidden, teacher_head, labels = hidden_state_case(
        teacher_width=16 if "hidden_weight" in arguments else 24
    )
    settings = {"alpha": 0.7, "beta": 0.4, **arguments}
    reference = DistillationLoss(**settings)(
        ModelOutput(student_hidden @ student_head.T, student_hidden),
        ModelOutput(teacher_hidden @ teacher_head.T, teacher_hidden),
        labels,
    )
    reference_gradients = torch.autograd.grad(reference.loss, (student_hidden, student_head))
    fused = ChunkedDistillationLoss(**settings, chunk_size=5)(
        ModelOutput(hidden=student_hidden, head=student_head),
        ModelOutput(hidden=teacher_hidden, head=teacher_head),
        labels,
    )
    fused_gradients = torch.autograd.grad(fused.loss, (student_hidden, student_head))
    for term in ("loss", "kd", "ce", "hidden"):
        if getattr(reference, term) is None:
            assert getattr(fused, term) is None
            continue
        assert torch.allclose(getattr(fused, term), getattr(reference, term), atol=1e-5), term
    for expected, actual in zip(reference_gradients, fused_gradients):
        assert torch.allclose(expected, actual, atol=1e-5)
    with torch.no_grad():  # evaluation: the same values without the gradients
        evaluated = ChunkedDistillationLoss(**settings, chunk_size=5)(
            ModelOutput(hidden=student_hidden, head=student_head),
            ModelOutput(hidden=teacher_hidden, head=teacher_head),
            labels,
        )
    assert torch.allclose(evaluated.loss, fused.loss)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_the_fused_loss_under_bf16_autocast_projects_in_bf16_and_sums_in_float32(divergence):
    """The GPU default (bf16 autocast, a bf16 teacher): the fused loss agrees with the full-logits loss computed
    from the same bf16 logits, and its gradients reach the float32 student in float32."""
    student_hidden, student_head, teacher_hidden, teacher_head, labels = hidden_state_case(11)
    teacher_head = teacher_head.bfloat16()
    criterion_settings = {"alpha": 1.0, "beta": 0.1, "divergence": divergence}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = ChunkedDistillationLoss(**criterion_settings, chunk_size=4)(
            ModelOutput(hidden=student_hidden, head=student_head),
            ModelOutput(hidden=teacher_hidden.bfloat16(), head=teacher_head),
            labels,
        )
        student_logits = student_hidden @ student_head.T  # bf16 under autocast, as the fused projection
        teacher_logits = teacher_hidden.bfloat16() @ teacher_head.T
    reference = DistillationLoss(**criterion_settings)(ModelOutput(student_logits), ModelOutput(teacher_logits), labels)
    assert fused.loss.dtype == torch.float32
    assert torch.allclose(fused.loss, reference.loss, rtol=1e-3)
    fused_gradients = torch.autograd.grad(fused.loss, (student_hidden, student_head))
    reference_gradients = torch.autograd.grad(reference.loss, (student_hidden, student_head))
    for expected, actual in zip(reference_gradients, fused_gradients):
        assert actual.dtype == torch.float32
        assert F.cosine_similarity(expected.flatten().float(), actual.flatten(), dim=0) > 0.999


BF16_CASES = {"forward_kl": {}, "forward_kl at T 2": {"temperature": 2.0}, "jsd": {"divergence": "jsd"}}


@pytest.mark.parametrize("arguments", BF16_CASES.values(), ids=BF16_CASES.keys())
def test_the_bf16_fused_loss_over_several_projections_and_head_products(arguments):
    """In 16 bits the positions go by ROWS_PER_PROJECTION to the vocabulary and by ROWS_PER_HEAD_PRODUCT into the
    head's gradient: with more targets than two of each (and a last block of fewer than ROWS_AT_ONCE rows), every
    boundary is crossed, and the loss still agrees with the full-logits one from the same bf16 logits."""
    length = chunked_loss.ROWS_PER_HEAD_PRODUCT + chunked_loss.ROWS_PER_PROJECTION // 2 + 3  # 2 of the 3 rows are full
    student_hidden, student_head, teacher_hidden, teacher_head, labels = hidden_state_case(12, length=length)
    targets = int((labels != IGNORE_INDEX).sum())
    assert targets > 2 * chunked_loss.ROWS_PER_HEAD_PRODUCT and targets % chunked_loss.ROWS_AT_ONCE != 0
    settings = {"alpha": 0.8, "beta": 0.3, **arguments}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = ChunkedDistillationLoss(**settings)(
            ModelOutput(hidden=student_hidden, head=student_head),
            ModelOutput(hidden=teacher_hidden.bfloat16(), head=teacher_head.bfloat16()),
            labels,
        )
        student_logits = student_hidden @ student_head.T
        teacher_logits = teacher_hidden.bfloat16() @ teacher_head.bfloat16().T
    reference = DistillationLoss(**settings)(ModelOutput(student_logits), ModelOutput(teacher_logits), labels)
    for term in ("loss", "kd", "ce"):
        assert torch.allclose(getattr(fused, term), getattr(reference, term), rtol=1e-3), term
    fused_gradients = torch.autograd.grad(fused.loss, (student_hidden, student_head))
    reference_gradients = torch.autograd.grad(reference.loss, (student_hidden, student_head))
    for expected, actual in zip(reference_gradients, fused_gradients):
        assert F.cosine_similarity(expected.flatten().float(), actual.flatten(), dim=0) > 0.999
        # Row by row too: a block, chunk or group written to the wrong rows would not move the cosine of the whole.
        # (rows without a target have no gradient: 0 both ways)
        expected_rows, actual_rows = expected.float().flatten(0, -2), actual.flatten(0, -2)
        row_errors = (expected_rows - actual_rows).norm(dim=-1)
        assert (row_errors <= 0.05 * expected_rows.norm(dim=-1) + 1e-12).all()


def test_distillation_loss_runs_as_setup_chooses_and_keeps_its_class_and_identity():
    criterion = DistillationLoss(alpha=0.5, divergence="jsd")
    spec, text = criterion.spec(), repr(criterion)
    assert not criterion.projects_hidden_states  # from the full logits until setup chooses
    assert criterion.run_as(fused=True) is criterion and criterion.projects_hidden_states
    assert type(criterion) is DistillationLoss and criterion.spec() == spec and repr(criterion) == text
    criterion.run_as(fused=True, cached_teacher=True)
    assert not criterion.projects_hidden_states  # the cache holds no hidden states
    assert type(criterion) is DistillationLoss and criterion.spec() == spec and repr(criterion) == text
    assert not criterion.run_as(fused=False).projects_hidden_states  # FSDP: the head is sharded
    assert not ClassicLoss().run_as(fused=True).projects_hidden_states
    chunked = ChunkedDistillationLoss(chunk_size=64)
    assert chunked.projects_hidden_states and chunked.run_as(fused=False).projects_hidden_states  # named: forced
    with pytest.raises(ValueError, match="reads the teacher's hidden states, which the cache does not hold"):
        chunked.run_as(fused=True, cached_teacher=True)
    with pytest.raises(ValueError, match="temperature 1"):
        DistillationLoss(temperature=2.0).run_as(fused=True, cached_teacher=True)
    with pytest.raises(ValueError, match="hidden_weight to 0"):
        DistillationLoss(hidden_weight=1.0).run_as(fused=True, cached_teacher=True)


def test_a_criterion_refuses_a_teacher_output_that_its_execution_does_not_read():
    student, teacher, labels = random_batch(seed=3)
    cached = loss.CachedTeacher(torch.zeros(3, 7, 2, dtype=torch.long), torch.zeros(3, 7, 2), torch.zeros(3, 7))
    with pytest.raises(ValueError, match="needs the teacher's ModelOutput"):
        DistillationLoss()(ModelOutput(student), cached, labels)
    with pytest.raises(ValueError, match="needs the teacher's cached distributions"):
        DistillationLoss().run_as(fused=False, cached_teacher=True)(ModelOutput(student), ModelOutput(teacher), labels)
    with pytest.raises(ValueError, match="needs the teacher's last hidden states and output head"):
        DistillationLoss().run_as(fused=True)(ModelOutput(student), ModelOutput(teacher), labels)


def reference_figures(student_logits, teacher_logits, labels):
    """KL(teacher || student) at T = 1 and top-1 agreements summed over target positions, one at a time, in
    float64, the teacher cropped to the student's vocabulary."""
    kl = agreements = 0.0
    for row in range(labels.size(0)):
        for position in range(labels.size(1) - 1):
            if labels[row, position + 1] == IGNORE_INDEX:
                continue
            student, teacher = (
                student_logits[row, position].double(),
                teacher_logits[row, position, : student_logits.size(-1)].double(),
            )
            p, q = torch.softmax(teacher, dim=-1), torch.softmax(student, dim=-1)
            kl += (p * torch.log(p / q)).sum().item()
            agreements += float(student.argmax() == teacher.argmax())
    return kl, agreements


@pytest.mark.parametrize("arguments", FUSED_CASES.values(), ids=FUSED_CASES.keys())
def test_evaluation_sums_from_hidden_states_match_the_full_logits_and_the_definitions(arguments):
    """What an evaluation reads of a batch, from the hidden states a chunk at a time (5 rows, with a last block of
    fewer than ROWS_AT_ONCE), equals the full-logits criterion's terms times the targets, and the KL at T = 1 and
    the top-1 agreements of their definitions."""
    student_hidden, student_head, teacher_hidden, teacher_head, labels = hidden_state_case(
        teacher_width=16 if "hidden_weight" in arguments else 24, length=15
    )
    settings = {"alpha": 0.7, "beta": 0.4, **arguments}
    student_logits, teacher_logits = student_hidden @ student_head.T, teacher_hidden @ teacher_head.T
    count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert count % chunked_loss.ROWS_AT_ONCE != 0
    with torch.no_grad():
        reference = DistillationLoss(**settings)(
            ModelOutput(student_logits, student_hidden), ModelOutput(teacher_logits, teacher_hidden), labels
        )
        full = DistillationLoss(**settings).evaluation_sums(
            ModelOutput(student_logits, student_hidden), ModelOutput(teacher_logits, teacher_hidden), labels
        )
        fused = (
            DistillationLoss(**settings)
            .run_as(fused=True)
            .evaluation_sums(
                ModelOutput(hidden=student_hidden, head=student_head),
                ModelOutput(hidden=teacher_hidden, head=teacher_head),
                labels,
            )
        )
    kl, agreements = reference_figures(student_logits, teacher_logits, labels)
    expected = torch.tensor([reference.loss * count, reference.kd * count, reference.ce * count, kl, agreements])
    assert fused.dtype == full.dtype == torch.float32
    assert torch.allclose(full, expected, rtol=1e-5, atol=1e-4)
    assert torch.allclose(fused, expected, rtol=1e-5, atol=1e-4)


def test_evaluation_sums_without_a_teacher_or_without_targets():
    student, teacher, labels = random_batch(seed=4)
    count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    ce = next_token_cross_entropy(student, labels)
    assert torch.allclose(
        ClassicLoss().evaluation_sums(ModelOutput(student), None, labels),
        torch.stack([ce * count, torch.tensor(0.0), ce * count, torch.tensor(0.0), torch.tensor(0.0)]),
    )
    student_hidden, student_head, teacher_hidden, teacher_head, labels = hidden_state_case()
    labels[:] = IGNORE_INDEX
    with torch.no_grad():
        sums = (
            DistillationLoss()
            .run_as(fused=True)
            .evaluation_sums(
                ModelOutput(hidden=student_hidden, head=student_head),
                ModelOutput(hidden=teacher_hidden, head=teacher_head),
                labels,
            )
        )
    assert torch.equal(sums, torch.zeros(5))


# Divergences and the hidden-state term.


def reference_divergence(p, q, divergence, jsd_beta=0.5, skew=0.1):
    """The divergence between two probability vectors with every entry positive, straight from its definition."""

    def kl(a, b):
        return (a * torch.log(a / b)).sum()

    if divergence == "forward_kl":
        return kl(p, q)
    if divergence == "reverse_kl":
        return kl(q, p)
    if divergence == "jsd":
        if jsd_beta == 0:
            return kl(p, q)
        if jsd_beta == 1:
            return kl(q, p)
        mixture = jsd_beta * p + (1 - jsd_beta) * q
        return jsd_beta * kl(p, mixture) + (1 - jsd_beta) * kl(q, mixture)
    if divergence == "skew_kl":
        return kl(p, skew * p + (1 - skew) * q)
    if divergence == "skew_reverse_kl":
        return kl(q, skew * q + (1 - skew) * p)
    assert divergence == "tv"
    return 0.5 * (p - q).abs().sum()


def reference_kd_of(student, teacher, labels, temperature, **divergence_arguments):
    """T**2 times the mean over target positions of the divergence between the softened distributions, in float64."""
    values = []
    for row in range(labels.size(0)):
        for position in range(labels.size(1) - 1):
            if labels[row, position + 1] == IGNORE_INDEX:
                continue
            p = torch.softmax(teacher[row, position, : student.size(-1)].double() / temperature, dim=-1)
            q = torch.softmax(student[row, position].double() / temperature, dim=-1)
            values.append(reference_divergence(p, q, **divergence_arguments))
    return temperature**2 * torch.stack(values).mean()


DIVERGENCE_CASES = [
    {"divergence": "forward_kl"},
    {"divergence": "reverse_kl"},
    {"divergence": "jsd"},
    {"divergence": "jsd", "jsd_beta": 0.2},
    {"divergence": "jsd", "jsd_beta": 0.0},
    {"divergence": "jsd", "jsd_beta": 1.0},
    {"divergence": "skew_kl"},
    {"divergence": "skew_kl", "skew": 0.4},
    {"divergence": "skew_reverse_kl"},
    {"divergence": "skew_reverse_kl", "skew": 0.4},
    {"divergence": "tv"},
]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("arguments", DIVERGENCE_CASES, ids=lambda case: "-".join(map(str, case.values())))
def test_each_divergence_matches_its_definition(arguments, temperature):
    student, teacher, labels = random_batch(seed=11, extra_teacher_vocab=2)
    output = DistillationLoss(alpha=0.7, beta=0.3, temperature=temperature, **arguments)(
        ModelOutput(student), ModelOutput(teacher), labels
    )
    expected = reference_kd_of(student, teacher, labels, temperature, **arguments)
    assert output.kd.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(output.ce, next_token_cross_entropy(student, labels), atol=1e-6)
    assert torch.allclose(output.loss, 0.7 * output.kd + 0.3 * output.ce, atol=1e-6)
    assert output.hidden is None


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_goes_through_the_fast_kd_and_cross_entropy(monkeypatch, temperature):
    calls = []

    def spy(*arguments, **keywords):
        calls.append(arguments)
        return kd_and_cross_entropy(*arguments, **keywords)

    monkeypatch.setattr(loss, "kd_and_cross_entropy", spy)
    student, teacher, labels = random_batch(seed=12)
    output = DistillationLoss(temperature=temperature)(ModelOutput(student), ModelOutput(teacher), labels)
    assert len(calls) == 1
    # The general path gives the same values, which checks it against the benchmarked one.
    general = divergence_and_cross_entropy(student, teacher, labels, temperature, 1.0, 0.1, "forward_kl")
    for term in ("loss", "kd", "ce"):
        assert torch.allclose(getattr(general, term), getattr(output, term), atol=1e-6), term


def random_log_probs(seed, rows=4, outcomes=6):
    generator = torch.Generator().manual_seed(seed)
    return F.log_softmax(2.0 * torch.randn(rows, outcomes, generator=generator), dim=-1)


@pytest.mark.parametrize("arguments", DIVERGENCE_CASES, ids=lambda case: "-".join(map(str, case.values())))
def test_divergence_is_zero_for_equal_distributions_and_positive_otherwise(arguments):
    student, teacher = random_log_probs(0), random_log_probs(1)
    same = token_divergence(teacher.clone(), teacher, **arguments)
    assert same.shape == (4,)
    assert torch.allclose(same, torch.zeros(4), atol=1e-6)
    assert (token_divergence(student, teacher, **arguments) > 1e-3).all()


def test_jsd_is_symmetric_at_one_half_and_tends_to_the_kl_divergences_at_its_ends():
    student, teacher = random_log_probs(2), random_log_probs(3)
    assert torch.allclose(token_divergence(student, teacher, "jsd"), token_divergence(teacher, student, "jsd"))
    assert not torch.allclose(
        token_divergence(student, teacher, "jsd", jsd_beta=0.2), token_divergence(teacher, student, "jsd", jsd_beta=0.2)
    )
    forward = token_divergence(student, teacher, "forward_kl")
    reverse = token_divergence(student, teacher, "reverse_kl")
    assert torch.allclose(token_divergence(student, teacher, "jsd", jsd_beta=0.0), forward)
    assert torch.allclose(token_divergence(student, teacher, "jsd", jsd_beta=1.0), reverse)
    # The end values are the limits of the jsd divided by its weight, which fixes which side is which.
    small = 1e-4
    assert torch.allclose(token_divergence(student, teacher, "jsd", jsd_beta=small) / small, forward, rtol=1e-2)
    assert torch.allclose(token_divergence(student, teacher, "jsd", jsd_beta=1 - small) / small, reverse, rtol=1e-2)


def test_skew_divergences_without_skew_are_the_kl_divergences():
    student, teacher = random_log_probs(4), random_log_probs(5)
    assert torch.allclose(
        token_divergence(student, teacher, "skew_kl", skew=0.0), token_divergence(student, teacher, "forward_kl")
    )
    assert torch.allclose(
        token_divergence(student, teacher, "skew_reverse_kl", skew=0.0),
        token_divergence(student, teacher, "reverse_kl"),
    )
    # Skewing bounds the divergence: KL(p || 0.1 p + 0.9 q) <= log(1 / 0.1).
    assert (token_divergence(student, teacher, "skew_kl", skew=0.1) <= math.log(10) + 1e-6).all()


def test_total_variation_hand_computed_and_at_most_one():
    # Teacher (0.8, 0.2), student (0.5, 0.5): 0.5 * (0.3 + 0.3).
    teacher = torch.tensor([[math.log(0.8), math.log(0.2)]])
    student = torch.tensor([[math.log(0.5), math.log(0.5)]])
    assert token_divergence(student, teacher, "tv").item() == pytest.approx(0.3, abs=1e-6)
    disjoint_teacher = torch.tensor([[0.0, float("-inf")]])
    disjoint_student = torch.tensor([[float("-inf"), 0.0]])
    assert token_divergence(disjoint_student, disjoint_teacher, "tv").item() == pytest.approx(1.0)
    assert (token_divergence(random_log_probs(6), random_log_probs(7), "tv") <= 1.0).all()


def test_bucketed_distributions_of_any_width_are_accepted():
    # E.g. the top 2 tokens plus the rest of the mass: 3 outcomes, unrelated to any vocabulary.
    teacher = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    student = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    expected = 0.6 * math.log(0.6 / 0.5) + 0.3 * math.log(0.3 / 0.25) + 0.1 * math.log(0.1 / 0.25)
    assert token_divergence(student, teacher, "forward_kl").item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="shape"):
        token_divergence(student, teacher[:, :2], "forward_kl")


TEACHER_ZERO_CASES = [case for case in DIVERGENCE_CASES if case != {"divergence": "forward_kl"}]


# Plain forward_kl goes through kd_and_cross_entropy, which expects the finite logits of a model's full vocabulary.
@pytest.mark.parametrize("arguments", TEACHER_ZERO_CASES, ids=lambda case: "-".join(map(str, case.values())))
def test_teacher_zeros_give_finite_values_and_gradients(arguments):
    student, teacher, labels = random_batch(seed=13)
    teacher[..., :4] = float("-inf")  # the teacher gives 4 of the 11 tokens probability exactly 0
    student.requires_grad_(True)
    output = DistillationLoss(alpha=1.0, beta=0.1, temperature=2.0, **arguments)(
        ModelOutput(student), ModelOutput(teacher), labels
    )
    assert torch.isfinite(output.loss) and output.kd.item() > 0.0
    output.loss.backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("arguments", DIVERGENCE_CASES, ids=lambda case: "-".join(map(str, case.values())))
def test_token_divergence_with_teacher_zeros_has_finite_gradients(arguments):
    student = random_log_probs(8).requires_grad_(True)
    teacher = F.log_softmax(torch.tensor([[0.0, 1.0, float("-inf"), -1.0, float("-inf"), 2.0]] * 4), dim=-1)
    value = token_divergence(student, teacher, **arguments).sum()
    assert torch.isfinite(value)
    value.backward()
    assert torch.isfinite(student.grad).all()


def test_exact_zeros_in_both_distributions_give_no_nan():
    teacher = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    student = torch.tensor([[0.5, 0.5, float("-inf")]], requires_grad=True)
    for divergence in DIVERGENCES:
        student.grad = None
        value = token_divergence(F.log_softmax(student, dim=-1), teacher, divergence, skew=0.3).sum()
        assert torch.isfinite(value), divergence
        value.backward()
        assert torch.isfinite(student.grad).all(), divergence


def random_hidden_states(seed, batch=3, length=7, width=5):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, width, generator=generator)
    return student, torch.randn(batch, length, width, generator=generator)


def test_hidden_cosine_term_matches_a_per_position_reference():
    student, teacher, labels = random_batch(seed=14)
    student_hidden, teacher_hidden = random_hidden_states(15)
    criterion = DistillationLoss(alpha=0.7, beta=0.3, temperature=2.0, hidden_weight=0.5)
    assert criterion.compares_hidden_states
    assert not DistillationLoss().compares_hidden_states
    output = criterion(ModelOutput(student, student_hidden), ModelOutput(teacher, teacher_hidden), labels)
    distances = [
        1 - F.cosine_similarity(student_hidden[row, position], teacher_hidden[row, position], dim=0)
        for row in range(labels.size(0))
        for position in range(labels.size(1) - 1)
        if labels[row, position + 1] != IGNORE_INDEX
    ]
    assert output.hidden.item() == pytest.approx(torch.stack(distances).mean().item(), abs=1e-6)
    assert torch.allclose(output.kd, reference_kd(student, teacher, labels, 2.0), atol=1e-6)
    assert torch.allclose(output.loss, 0.7 * output.kd + 0.3 * output.ce + 0.5 * output.hidden, atol=1e-6)


def test_hidden_term_alone_trains_only_the_scored_positions():
    student, teacher, labels = random_batch(seed=16)
    student_hidden, teacher_hidden = random_hidden_states(17)
    student_hidden.requires_grad_(True)
    criterion = DistillationLoss(alpha=0.0, beta=0.0, hidden_weight=1.0)
    output = criterion(ModelOutput(student, student_hidden), ModelOutput(teacher, teacher_hidden), labels)
    assert torch.equal(output.loss, output.hidden)
    output.loss.backward()
    not_scored = torch.ones_like(labels, dtype=torch.bool)
    not_scored[:, :-1] = labels[:, 1:] == IGNORE_INDEX
    assert student_hidden.grad[not_scored].abs().max().item() == 0.0
    assert student_hidden.grad[~not_scored].abs().sum().item() > 0.0


def test_hidden_term_refuses_missing_or_different_width_hidden_states():
    student, teacher, labels = random_batch(seed=18)
    student_hidden, teacher_hidden = random_hidden_states(19)
    criterion = DistillationLoss(hidden_weight=0.5)
    with pytest.raises(ValueError, match="needs the student's and the teacher's last hidden states"):
        criterion(ModelOutput(student), ModelOutput(teacher), labels)
    with pytest.raises(ValueError, match="needs the student's and the teacher's last hidden states"):
        criterion(ModelOutput(student, student_hidden), ModelOutput(teacher), labels)
    with pytest.raises(ValueError, match=r"hidden width \(5\) differs from the teacher's \(4\)"):
        criterion(ModelOutput(student, student_hidden), ModelOutput(teacher, teacher_hidden[..., :4]), labels)
    # Without the hidden term, hidden states of any width are ignored.
    DistillationLoss()(ModelOutput(student, student_hidden), ModelOutput(teacher, teacher_hidden[..., :4]), labels)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_a_batch_without_targets_gives_zeros_that_stay_in_the_graph(divergence):
    student, teacher, labels = random_batch(seed=20)
    student_hidden, teacher_hidden = random_hidden_states(21)
    student.requires_grad_(True)
    student_hidden.requires_grad_(True)
    labels[:] = IGNORE_INDEX
    output = DistillationLoss(divergence=divergence, hidden_weight=1.0)(
        ModelOutput(student, student_hidden), ModelOutput(teacher, teacher_hidden), labels
    )
    assert output.loss.item() == 0.0 and output.kd.item() == 0.0 and output.hidden.item() == 0.0
    output.loss.backward()
    assert student.grad.abs().max().item() == 0.0


def test_spec_names_only_the_arguments_that_differ_from_the_defaults():
    assert DistillationLoss().spec() == {"()": "loss.DistillationLoss", "alpha": 1.0, "beta": 0.1, "temperature": 1.0}
    jsd = DistillationLoss(divergence="jsd", jsd_beta="3e-1", skew=0.2)
    assert jsd.spec() == {
        "()": "loss.DistillationLoss",
        "alpha": 1.0,
        "beta": 0.1,
        "temperature": 1.0,
        "divergence": "jsd",
        "jsd_beta": 0.3,
    }
    assert DistillationLoss(divergence="jsd").spec()["divergence"] == "jsd"
    assert "jsd_beta" not in DistillationLoss(divergence="jsd").spec()
    skewed = DistillationLoss(divergence="skew_reverse_kl", jsd_beta=0.3, skew=0.2, hidden_weight=0.5)
    assert skewed.spec() == {
        "()": "loss.DistillationLoss",
        "alpha": 1.0,
        "beta": 0.1,
        "temperature": 1.0,
        "divergence": "skew_reverse_kl",
        "skew": 0.2,
        "hidden_weight": 0.5,
    }
    for criterion in (jsd, skewed):
        arguments = {key: value for key, value in criterion.spec().items() if key != "()"}
        assert DistillationLoss(**arguments).spec() == criterion.spec()


def test_chunked_loss_keeps_its_spec_and_its_logits_free_call():
    criterion = ChunkedDistillationLoss(alpha=0.5, beta=0.2, temperature=2.0, chunk_size=64)
    assert criterion.spec() == {
        "()": "loss.ChunkedDistillationLoss",
        "alpha": 0.5,
        "beta": 0.2,
        "temperature": 2.0,
        "chunk_size": 64,
    }
    assert criterion.divergence == "forward_kl" and not criterion.compares_hidden_states


def test_classic_loss_ignores_hidden_states_and_old_outputs_still_build():
    student, _, labels = random_batch(seed=22)
    student_hidden, teacher_hidden = random_hidden_states(23)
    criterion = ClassicLoss()
    assert not criterion.compares_hidden_states
    output = criterion(ModelOutput(student, student_hidden), None, labels)
    assert output.hidden is None and torch.equal(output.loss, output.ce)
    assert LossOutput(output.loss, None, output.ce).hidden is None
