"""Models: tokenizer padding, frozen teacher, student construction, compatibility checks and load errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, PreTrainedTokenizerFast

import dataset
import models
from assets.build_tiny import train_byte_level_tokenizer
from helpers import save_gpt2


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
    return train_byte_level_tokenizer(texts, vocab_size=300)


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


# ---------------------------------------------------------------- student initialisation from the teacher


@pytest.mark.parametrize(
    "teacher_layers, student_layers, expected",
    [
        (12, 6, [0, 2, 4, 7, 9, 11]),  # Hugging Face's distilgpt2 choice
        (12, 12, list(range(12))),
        (12, 2, [0, 11]),
        (12, 3, [0, 6, 11]),  # 5.5 rounds up
        (6, 3, [0, 3, 5]),  # 2.5 rounds up, where round() would give 2
        (4, 2, [0, 3]),
        (4, 1, [0]),
        (1, 1, [0]),
    ],
)
def test_uniform_layers_are_evenly_spaced_from_first_to_last(teacher_layers, student_layers, expected):
    assert models.uniform_layers(teacher_layers, student_layers) == expected


@pytest.mark.parametrize("student_layers", [0, 5])
def test_uniform_layers_refuse_a_student_outside_the_teacher(student_layers):
    with pytest.raises(models.ModelError, match=rf"nb_layers is {student_layers}.*from 1 to 4"):
        models.uniform_layers(4, student_layers)


def test_student_init_layers_follows_the_config():
    assert models.student_init_layers("random", None, 12, 6) is None
    assert models.student_init_layers("uniform", None, 12, 6) == [0, 2, 4, 7, 9, 11]
    assert models.student_init_layers("teacher_layers", [1, 5], 12, 2) == [1, 5]
    with pytest.raises(models.ModelError, match=r"teacher block 12 does not exist.*from 0 to 11"):
        models.student_init_layers("teacher_layers", [0, 12], 12, 2)
    with pytest.raises(models.ModelError, match="one teacher block per student layer"):
        models.student_init_layers("teacher_layers", [0], 12, 2)


@pytest.fixture(scope="module")
def four_layer_teacher(tmp_path_factory, tokenizer):
    return models.load_teacher(str(save_gpt2(tmp_path_factory.mktemp("teacher4"), tokenizer, nb_layers=4, seed=7)))


def test_initialise_from_teacher_copies_embeddings_chosen_blocks_norm_and_head(four_layer_teacher, caplog):
    teacher = four_layer_teacher
    teacher_before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    torch.manual_seed(1)
    student = models.build_student(teacher.config, nb_layers=2)
    torch.manual_seed(1)
    random_student = models.build_student(teacher.config, nb_layers=2)

    with caplog.at_level("INFO", logger="models"):
        copied = models.initialise_from_teacher(student, teacher, [0, 3])

    assert copied == [
        "embeddings (transformer.wte, transformer.wpe)",
        "blocks 0<-0, 1<-3",
        "final norm (transformer.ln_f)",
        "output head (tied to the embeddings)",
    ]
    assert [record.getMessage() for record in caplog.records] == [
        "Student initialised from the teacher: " + "; ".join(copied)
    ]
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for name, tensor in student_state.items():
        source = name.replace("transformer.h.1.", "transformer.h.3.")
        assert torch.equal(tensor, teacher_state[source]), name
    for module in ("wte", "wpe", "ln_f"):
        assert torch.equal(getattr(student.transformer, module).weight, getattr(teacher.transformer, module).weight)
    assert torch.equal(student.transformer.h[1].mlp.c_fc.weight, teacher.transformer.h[3].mlp.c_fc.weight)
    assert not torch.equal(student.transformer.h[1].mlp.c_fc.weight, teacher.transformer.h[1].mlp.c_fc.weight)
    assert student.lm_head.weight is student.transformer.wte.weight
    assert all(parameter.dtype == torch.float32 for parameter in student.parameters())

    input_ids = torch.randint(0, teacher.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(student.eval()(input_ids).logits, random_student.eval()(input_ids).logits)
    after = teacher.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in teacher_before.items())


def test_initialise_from_a_bfloat16_teacher_keeps_the_student_dtype(four_layer_teacher):
    teacher = four_layer_teacher
    student = models.build_student(teacher.config, nb_layers=2)
    half_teacher = AutoModelForCausalLM.from_config(teacher.config).to(torch.bfloat16)
    half_teacher.load_state_dict(teacher.state_dict())
    models.initialise_from_teacher(student, half_teacher, [1, 2])
    assert student.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(
        student.transformer.h[0].attn.c_attn.weight, half_teacher.transformer.h[1].attn.c_attn.weight.float()
    )


def test_initialise_from_teacher_refuses_a_block_past_the_teacher(four_layer_teacher):
    student = models.build_student(four_layer_teacher.config, nb_layers=2)
    before = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    with pytest.raises(models.ModelError, match=r"teacher block 4 does not exist: the teacher has 4 blocks.*0 to 3"):
        models.initialise_from_teacher(student, four_layer_teacher, [0, 4])
    with pytest.raises(models.ModelError, match="one teacher block per student layer"):
        models.initialise_from_teacher(student, four_layer_teacher, [0, 1, 2])
    assert all(torch.equal(student.state_dict()[name], tensor) for name, tensor in before.items())


def test_initialise_from_teacher_refuses_a_student_of_another_width(four_layer_teacher, tmp_path, tokenizer):
    narrow = models.load_teacher(str(save_gpt2(tmp_path / "narrow", tokenizer, nb_layers=2, width=16)))
    student = models.build_student(narrow.config, nb_layers=2)
    before = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    with pytest.raises(models.ModelError) as raised:
        models.initialise_from_teacher(student, four_layer_teacher, [0, 3])
    message = str(raised.value)
    assert "transformer.wte.weight has shape (" in message and f"{(len(tokenizer), 16)}" in message
    assert f"{(len(tokenizer), 32)}" in message and "student.init to random" in message and "\n" not in message
    assert all(torch.equal(student.state_dict()[name], tensor) for name, tensor in before.items())


def test_initialise_from_teacher_refuses_a_student_with_tensors_the_teacher_lacks(four_layer_teacher):
    student = models.build_student(four_layer_teacher.config, nb_layers=2)
    student.transformer.register_buffer("extra", torch.zeros(3))
    with pytest.raises(models.ModelError, match=r"student's transformer.extra has no counterpart transformer.extra in"):
        models.initialise_from_teacher(student, four_layer_teacher, [0, 3])


def test_a_student_trains_in_float32_beside_a_bfloat16_teacher(teacher_dir, tmp_path):
    """On a GPU the teacher is loaded in bfloat16 (teacher.dtype auto); the student built from its config, and a
    pretrained student saved in bfloat16, still get float32 weights (and optimizer states), and say so on disk."""
    teacher = models.load_teacher(str(teacher_dir), torch.bfloat16)
    assert teacher.dtype == torch.bfloat16 and teacher.config.dtype == torch.bfloat16
    student = models.build_student(teacher.config, nb_layers=1)
    assert {parameter.dtype for parameter in student.parameters()} == {torch.float32}
    assert teacher.config.dtype == torch.bfloat16  # the teacher's own config is left as it was
    student.save_pretrained(tmp_path / "student")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "student").dtype == torch.float32

    teacher.save_pretrained(tmp_path / "bf16")  # a checkpoint saved in bfloat16, used as a pretrained student
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16  # as saved, by default
    pretrained = models.build_student(None, nb_layers=1, pretrained=str(tmp_path / "bf16"))
    assert {parameter.dtype for parameter in pretrained.parameters()} == {torch.float32}
