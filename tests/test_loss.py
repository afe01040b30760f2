"""The criteria against independent formulas, hand-computed cases, and padding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dataset
from loss import IGNORE_INDEX, ClassicLoss, DistillationLoss, kd_kl_divergence, next_token_cross_entropy


def random_batch(seed: int = 0, batch: int = 3, length: int = 7, vocab: int = 11, extra_teacher_vocab: int = 0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocab, generator=generator)
    teacher = torch.randn(batch, length, vocab + extra_teacher_vocab, generator=generator)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[0, 5:] = IGNORE_INDEX  # a padded row
    labels[1, :3] = IGNORE_INDEX  # a masked prompt
    return student, teacher, labels


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
    assert torch.allclose(kd_kl_divergence(student, teacher, labels, temperature), expected, atol=1e-6)


def test_kd_hand_computed_two_token_vocabulary():
    # One target; at position 0 the teacher's probabilities are (0.8, 0.2) and the student's (0.5, 0.5).
    teacher = torch.tensor([[[math.log(0.8), math.log(0.2)], [0.0, 0.0]]])
    student = torch.zeros(1, 2, 2)
    labels = torch.tensor([[1, 0]])
    expected = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert kd_kl_divergence(student, teacher, labels, 1.0).item() == pytest.approx(expected, abs=1e-6)


def test_kd_of_identical_distributions_is_zero_and_positive_otherwise():
    student, teacher, labels = random_batch()
    assert kd_kl_divergence(student, student.clone(), labels, 1.5).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl_divergence(student, teacher, labels, 1.5).item() > 0.01


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
    output = criterion(student, labels, teacher)
    assert torch.allclose(output.kd, reference_kd(student, teacher, labels, 2.0), atol=1e-6)
    assert torch.allclose(output.ce, next_token_cross_entropy(student, labels))
    assert torch.allclose(output.loss, 0.7 * output.kd + 0.3 * output.ce)


def test_teacher_extra_tokens_are_cropped_to_the_student_vocabulary():
    student, teacher, labels = random_batch(seed=2, extra_teacher_vocab=3)
    cropped = DistillationLoss(temperature=1.0)(student, labels, teacher[..., :-3].contiguous())
    full = DistillationLoss(temperature=1.0)(student, labels, teacher)
    assert torch.allclose(cropped.kd, full.kd)
    # The extra columns really are ignored, not renormalised in: changing them changes nothing.
    teacher[..., -3:] += 100.0
    assert torch.allclose(DistillationLoss(temperature=1.0)(student, labels, teacher).kd, full.kd)


def test_teacher_smaller_than_student_is_refused():
    student, teacher, labels = random_batch()
    with pytest.raises(ValueError, match="vocabulary"):
        kd_kl_divergence(student, teacher[..., :-1], labels, 1.0)


def test_classic_loss_is_cross_entropy_without_teacher():
    student, _, labels = random_batch(seed=4)
    output = ClassicLoss()(student, labels)
    assert output.kd is None
    assert torch.equal(output.loss, output.ce)
    assert torch.allclose(output.ce, next_token_cross_entropy(student, labels))


def test_gradients_flow_to_the_student_only_through_real_targets():
    student, teacher, labels = random_batch(seed=5)
    student.requires_grad_(True)
    DistillationLoss(alpha=1.0, beta=1.0, temperature=2.0)(student, labels, teacher).loss.backward()
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
    samples = [{"input_ids": tokenizer(text)["input_ids"] + [tokenizer.eos_token_id], "prompt_length": 0} for text in texts]
    collate = dataset.PaddingCollator(tokenizer.pad_token_id)
    criterion = DistillationLoss(alpha=1.0, beta=0.5, temperature=2.0)

    def loss_of(batch):
        with torch.no_grad():
            student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return criterion(student_logits, batch["labels"], teacher_logits)

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
    ],
)
def test_invalid_distillation_arguments_are_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        DistillationLoss(**arguments)


def test_numeric_strings_are_accepted_as_yaml_1_1_reads_them():
    assert DistillationLoss(alpha="1e-1", beta="5e-1", temperature="2").spec() == {
        "()": "loss.DistillationLoss", "alpha": 0.1, "beta": 0.5, "temperature": 2.0,
    }


def test_chunked_loss_matches_the_full_logits_loss_in_value_and_gradient():
    from loss import ChunkedDistillationLoss

    generator = torch.Generator().manual_seed(7)
    batch, length, width, teacher_width, vocab = 3, 9, 16, 24, 50
    student_hidden = torch.randn(batch, length, width, generator=generator, requires_grad=True)
    student_head = torch.randn(vocab, width, generator=generator, requires_grad=True)
    teacher_hidden = torch.randn(batch, length, teacher_width, generator=generator)
    teacher_head = torch.randn(vocab + 3, teacher_width, generator=generator)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[0, 6:] = IGNORE_INDEX
    labels[2, :4] = IGNORE_INDEX

    reference = DistillationLoss(alpha=0.7, beta=0.4, temperature=2.0)(
        student_hidden @ student_head.T, labels, teacher_hidden @ teacher_head.T
    )
    reference_gradients = torch.autograd.grad(reference.loss, (student_hidden, student_head))
    chunked = ChunkedDistillationLoss(alpha=0.7, beta=0.4, temperature=2.0, chunk_size=5)(
        student_hidden, student_head, labels, teacher_hidden, teacher_head
    )
    chunked_gradients = torch.autograd.grad(chunked.loss, (student_hidden, student_head))
    for term in ("loss", "kd", "ce"):
        assert torch.allclose(getattr(chunked, term), getattr(reference, term), atol=1e-5), term
    for expected, actual in zip(reference_gradients, chunked_gradients):
        cosine = F.cosine_similarity(expected.flatten(), actual.flatten(), dim=0)
        assert cosine.item() >= 0.9999
        assert torch.allclose(expected, actual, atol=1e-5)
