"""Tokenizer, frozen teacher and student, from a Hugging Face Hub name or a local directory.

Every user mistake here (a name that cannot be loaded, a student deeper than its teacher, tokenizers that disagree)
raises `ModelError` with one sentence naming the problem and the fix.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

logger = logging.getLogger(__name__)

OFFLINE_HINT = (
    "if the Hugging Face Hub cannot be reached, set teacher.name (and student.pretrained) to a local directory "
    "such as assets/tiny/teacher, or run the embedded demo with --config configs/tiny.yaml"
)


class ModelError(ValueError):
    """A model, tokenizer or their combination that cannot be used; the message is shown as it is."""


def load_tokenizer(name: str):
    """The tokenizer of `name`; GPT-2 has no pad token, so padding uses EOS (labels mask padding by attention)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ModelError(f"could not load a tokenizer from {name!r} ({_first_line(error)}); {OFFLINE_HINT}.") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of {name!r} has no EOS token; samples need one to mark their end.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(name: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise ModelError(f"could not load a model config from {name!r} ({_first_line(error)}); {OFFLINE_HINT}.") from None


# GPT-2's "gelu_new" (and "gelu_fast") is the tanh approximation of GELU written as six elementwise operations;
# "gelu_pytorch_tanh" is the same function in one fused kernel, equal up to float rounding. Elementwise passes are
# memory-bound, so on a CPU they are a large share of a step: the models here always use the fused one.
FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh", "gelu_fast": "gelu_pytorch_tanh"}


def with_fused_activation(config: PretrainedConfig) -> PretrainedConfig:
    activation = getattr(config, "activation_function", None)
    if activation in FUSED_ACTIVATIONS:
        config.activation_function = FUSED_ACTIVATIONS[activation]
    return config


def load_teacher(name: str, dtype: Optional[torch.dtype] = None) -> PreTrainedModel:
    """The teacher, frozen: eval mode (no dropout) and no parameter requires a gradient."""
    teacher = _load_pretrained(name, "teacher", dtype)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def build_student(
    teacher_config: PretrainedConfig, nb_layers: int, pretrained: Optional[str] = None
) -> PreTrainedModel:
    """The student: a pretrained model when `pretrained` names one, else the untrained truncated teacher.

    The untrained truncated student is the "untrained truncated distilgpt2" of the seed project: the teacher's
    config (for GPT-2 that is GPT-2's config) with `nb_layers` layers, randomly initialised.
    """
    if pretrained is not None:
        return _load_pretrained(pretrained, "student", None)
    teacher_layers = teacher_config.num_hidden_layers
    if not 1 <= nb_layers <= teacher_layers:
        raise ModelError(
            f"distilled_model.nb_layers is {nb_layers}, but the teacher has {teacher_layers} layers; "
            f"choose a value from 1 to {teacher_layers}."
        )
    student_config = with_fused_activation(teacher_config.__class__.from_dict(teacher_config.to_dict()))
    student_config.num_hidden_layers = nb_layers
    return AutoModelForCausalLM.from_config(student_config)


def check_compatible(tokenizer, student_config: PretrainedConfig, teacher_config: Optional[PretrainedConfig],
                     student_tokenizer=None) -> None:
    """Stop at start-up on a combination that would fail or silently mislead deep inside the training loop."""
    if student_tokenizer is not None and not same_tokenizer(tokenizer, student_tokenizer):
        raise ModelError(
            "the teacher and the student use different tokenizers, so their token distributions cannot be compared; "
            "pick a student trained with the teacher's tokenizer."
        )
    if len(tokenizer) > student_config.vocab_size:
        raise ModelError(
            f"the tokenizer has {len(tokenizer)} tokens but the student's vocabulary has only "
            f"{student_config.vocab_size}; use a student built for this tokenizer."
        )
    if teacher_config is not None and teacher_config.vocab_size < student_config.vocab_size:
        raise ModelError(
            f"the teacher's vocabulary ({teacher_config.vocab_size}) is smaller than the student's "
            f"({student_config.vocab_size}); the teacher must cover every token the student can predict."
        )


def max_positions(model_config: PretrainedConfig) -> Optional[int]:
    return getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)


def same_tokenizer(first, second) -> bool:
    return first.get_vocab() == second.get_vocab() and first.eos_token_id == second.eos_token_id


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _load_pretrained(name: str, role: str, dtype: Optional[torch.dtype]) -> PreTrainedModel:
    try:
        config = with_fused_activation(AutoConfig.from_pretrained(name))
        return AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype)
    except (OSError, ValueError) as error:
        raise ModelError(f"could not load the {role} model from {name!r} ({_first_line(error)}); {OFFLINE_HINT}.") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def train_byte_level_tokenizer(texts, vocab_size: int, eos_token: str = "<|endoftext|>"):
    """A GPT-2-style byte-level BPE tokenizer trained on `texts`, for the embedded demo and the tests.

    Its only special token is the EOS, which (as in GPT-2) also serves as BOS and as padding.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos_token, bos_token=eos_token, unk_token=eos_token, pad_token=eos_token
    )
