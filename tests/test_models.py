"""Models: tokenizer padding, frozen teacher, student construction, compatibility checks and load errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, PreTrainedTokenizerFast

import dataset
import models
from conftest import save_gpt2


def config_with_vocab(vocab_size: int) -> GPT2Config:
    """A tiny GPT-2 config: only its vocabulary size matters to check_compatible."""
    return GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=16, n_layer=1, n_head=2)


# ---------------------------------------------------------------- load_tokenizer / load_teacher


def test_load_tokenizer_pads_with_eos_when_pad_is_missing(tmp_path, tokenizer):
    without_pad = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token=tokenizer.eos_token)
    without_pad.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token_id is None  # the saved tokenizer really lacks one

    loaded = models.load_tokenizer(str(tmp_path))
    assert loaded.eos_token_id == tokenizer.eos_token_id
    assert loaded.pad_token_id == loaded.eos_token_id
    assert loaded.pad_token == loaded.eos_token


def test_load_teacher_is_frozen_and_in_eval_mode(teacher_dir, monkeypatch):
    real_from_pretrained = AutoModelForCausalLM.from_pretrained

    def in_train_mode(*args, **kwargs):  # from_pretrained already returns eval mode; make load_teacher prove it sets it
        return real_from_pretrained(*args, **kwargs).train()

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", in_train_mode)
    teacher = models.load_teacher(str(teacher_dir))
    assert not teacher.training
    assert not any(module.training for module in teacher.modules())
    parameters = list(teacher.parameters())
    assert parameters and not any(parameter.requires_grad for parameter in parameters)
    assert teacher.config.n_layer == 2


def test_load_teacher_keeps_saved_weights(teacher_dir):
    teacher = models.load_teacher(str(teacher_dir))
    reference = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert torch.equal(teacher.transformer.wte.weight, reference.transformer.wte.weight)


def test_teacher_runs_the_fused_gelu_with_the_same_outputs(teacher_dir):
    reference = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    assert reference.config.activation_function == "gelu_new"  # GPT-2's own, as saved
    teacher = models.load_teacher(str(teacher_dir))
    assert teacher.config.activation_function == "gelu_pytorch_tanh"
    input_ids = torch.randint(0, reference.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = reference(input_ids).logits, teacher(input_ids).logits
    assert torch.allclose(actual, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- build_student


def test_build_student_truncates_the_teacher(teacher_dir):
    teacher = models.load_teacher(str(teacher_dir))
    student = models.build_student(teacher.config, nb_layers=1)
    assert student.config.n_layer == 1 and len(student.transformer.h) == 1
    assert student.config.n_embd == teacher.config.n_embd
    assert student.config.vocab_size == teacher.config.vocab_size
    assert student.get_input_embeddings().weight.shape == teacher.get_input_embeddings().weight.shape
    assert not torch.equal(student.transformer.wte.weight, teacher.transformer.wte.weight)
    assert not torch.equal(student.transformer.h[0].attn.c_attn.weight, teacher.transformer.h[0].attn.c_attn.weight)
    assert models.count_parameters(student) < models.count_parameters(teacher)
    assert teacher.config.n_layer == 2  # building the student does not modify the teacher's config


@pytest.mark.parametrize("nb_layers", [0, -1, 3])
def test_build_student_rejects_layer_counts_outside_the_teacher(teacher_dir, nb_layers):
    teacher_config = models.load_model_config(str(teacher_dir))
    with pytest.raises(models.ModelError, match=rf"nb_layers is {nb_layers}.*from 1 to 2"):
        models.build_student(teacher_config, nb_layers=nb_layers)


def test_build_student_loads_a_pretrained_directory(tmp_path, tokenizer, teacher_dir):
    student_dir = save_gpt2(tmp_path / "student", tokenizer, nb_layers=1, width=16, seed=5)
    teacher_config = models.load_model_config(str(teacher_dir))
    student = models.build_student(teacher_config, nb_layers=1, pretrained=str(student_dir))
    reference = AutoModelForCausalLM.from_pretrained(student_dir)
    assert student.config.n_embd == 16 and student.config.n_layer == 1
    student_state, reference_state = student.state_dict(), reference.state_dict()
    assert student_state.keys() == reference_state.keys()
    assert all(torch.equal(student_state[name], reference_state[name]) for name in reference_state)


# ---------------------------------------------------------------- check_compatible


@pytest.fixture(scope="module")
def other_tokenizer(rows):
    texts = [row["instruction"] + " " + row["output"] for row in rows]
    return models.train_byte_level_tokenizer(texts, vocab_size=300)


def test_check_compatible_rejects_a_different_student_tokenizer(tokenizer, other_tokenizer):
    assert len(other_tokenizer) != len(tokenizer)
    config = config_with_vocab(len(tokenizer))
    with pytest.raises(models.ModelError, match="different tokenizers"):
        models.check_compatible(tokenizer, config, config, student_tokenizer=other_tokenizer)


def test_check_compatible_rejects_a_tokenizer_larger_than_the_student_vocabulary(tokenizer):
    student = config_with_vocab(len(tokenizer) - 10)
    with pytest.raises(models.ModelError, match=rf"{len(tokenizer)} tokens.*only {len(tokenizer) - 10}"):
        models.check_compatible(tokenizer, student, config_with_vocab(len(tokenizer)))


def test_check_compatible_rejects_a_teacher_vocabulary_smaller_than_the_student(tokenizer):
    student, teacher = config_with_vocab(len(tokenizer) + 8), config_with_vocab(len(tokenizer))
    with pytest.raises(models.ModelError, match=r"teacher's vocabulary .* smaller than the student's"):
        models.check_compatible(tokenizer, student, teacher)


def test_check_compatible_accepts_a_teacher_with_extra_tokens(tokenizer, teacher_dir):
    same_tokenizer = models.load_tokenizer(str(teacher_dir))  # a reloaded copy, not the same object
    assert same_tokenizer is not tokenizer
    student, teacher = config_with_vocab(len(tokenizer)), config_with_vocab(len(tokenizer) + 8)
    models.check_compatible(tokenizer, student, teacher, student_tokenizer=same_tokenizer)
    models.check_compatible(tokenizer, student, None)


# ---------------------------------------------------------------- load errors


LOADERS = {
    "tokenizer": models.load_tokenizer,
    "config": models.load_model_config,
    "teacher": models.load_teacher,
    "student": lambda name: models.build_student(GPT2Config(n_layer=2), nb_layers=1, pretrained=name),
}


@pytest.mark.parametrize("what", sorted(LOADERS))
@pytest.mark.parametrize("missing", ["absolute", "hub_like"])
def test_missing_model_is_a_model_error_with_a_hint(tmp_path, what, missing):
    name = str(tmp_path / "no_such_model") if missing == "absolute" else "no-such-owner/no-such-model"
    with pytest.raises(models.ModelError) as raised:  # an OSError from transformers would escape and fail here
        LOADERS[what](name)
    message = str(raised.value)
    assert name in message
    assert "configs/tiny.yaml" in message and "local directory" in message
    assert "\n" not in message


def test_tokenizer_fingerprint_matches_a_reloaded_copy(tokenizer, teacher_dir, other_tokenizer):
    """The data cache is keyed by this fingerprint: a saved and reloaded tokenizer must reuse it."""
    reloaded = models.load_tokenizer(str(teacher_dir))
    assert dataset.tokenizer_fingerprint(reloaded) == dataset.tokenizer_fingerprint(tokenizer)
    assert dataset.tokenizer_fingerprint(other_tokenizer) != dataset.tokenizer_fingerprint(tokenizer)
