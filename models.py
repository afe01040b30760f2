"""Tokenizer, frozen teacher and student, from a Hugging Face Hub name or a local directory.

Every user mistake here (a name that cannot be loaded, a student deeper than its teacher, tokenizers that disagree)
raises `ModelError` with one sentence naming the problem and the fix.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from distillation.base import file_identity
from distillation.base.errors import UserError, first_line
from distillation.settings.schema import is_hub_repo_id, one_block_per_layer_problem

logger = logging.getLogger(__name__)

OFFLINE_HINT = (
    "if the Hugging Face Hub cannot be reached, set teacher.name (and student.pretrained) to a local directory "
    "such as assets/tiny/teacher, or run the embedded demo with --config configs/tiny.yaml"
)


class ModelError(UserError):
    """A model, tokenizer or their combination that cannot be used; the message is shown as it is."""


def load_tokenizer(name: str, key: str = "teacher.name"):
    """The tokenizer of `name`; GPT-2 has no pad token, so padding uses EOS (labels mask padding by attention)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError, TypeError) as error:  # the last two: tokenizer files of another shape
        raise _load_error("a tokenizer", name, key, error) from None
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        # transformers builds an empty tokenizer from config.json alone when the tokenizer files are missing
        raise ModelError(
            f"the tokenizer of {key} {name!r} holds no token but its special ones, so its files (tokenizer.json, or "
            f"vocab.json and merges.txt) are missing or empty; put them back, or set {key} to another model."
        )
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of {name!r} has no EOS token; samples need one to mark their end.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(name: str, key: str = "teacher.name") -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise _load_error("a model config", name, key, error) from None


def model_identity(name: str, key: str = "teacher.name") -> str:
    """The digest of the files that decide the outputs of the model `name`, each read whole (file_identity); a Hub
    name's files are those of its cached snapshot, downloaded when missing, as from_pretrained would."""
    from transformers.utils import cached_file

    def resolve(filename: str) -> str | None:
        return cached_file(name, filename, _raise_exceptions_for_missing_entries=False)

    try:
        return file_identity.content_digest(file_identity.model_files(resolve))
    except (OSError, ValueError) as error:
        raise _load_error("the model files", name, key, error) from None


def _load_error(what: str, name: str, key: str, error: BaseException) -> ModelError:
    """A loading error of transformers in one sentence: for a local directory the fix is in its files, for a Hub
    name it is the network or a local copy."""
    if Path(name).expanduser().exists():
        fix = f"repair or replace the files in {name}, or set {key} to another model"
    else:
        fix = f"{OFFLINE_HINT} (relative paths are read from the current directory, {Path.cwd()})"
    return ModelError(f"could not load {what} from {key} {name!r} ({first_line(error)}); {fix}.")


# The JSON files of a model directory that transformers reads; each must hold one JSON object.
MODEL_JSON_FILES = ("config.json", "tokenizer_config.json", "special_tokens_map.json")


def check_model_directory(name: str, key: str) -> None:
    """Refuse a damaged local model directory in one sentence naming the damaged file. transformers' own errors
    name neither the file (a truncated safetensors) nor the config key, or escape as other types (a tokenizer.json
    that holds no tokenizer). A Hub name, or a directory that does not exist, is left to from_pretrained."""
    path = Path(name).expanduser()
    if path.is_file():
        raise ModelError(
            f"{key} is {name}, a file; set it to a model directory (config.json, weights and tokenizer "
            f"files) or a Hugging Face Hub name."
        )
    if not path.exists() and not is_hub_repo_id(name):
        # Not a Hub name, so a path; transformers would say only that the Hub has no such repository.
        relative = "" if path.is_absolute() else f" (a relative path is read from the current directory, {Path.cwd()})"
        raise ModelError(
            f"{key} is {name}, which is not a Hugging Face Hub name, and no such directory exists{relative}; set "
            f"{key} to the model directory's absolute path, or run from the directory it is relative to."
        )
    if not path.is_dir():
        return
    for filename in MODEL_JSON_FILES:
        _check_json_object(path / filename, key)
    _check_tokenizer_file(path / "tokenizer.json", key)
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt"):  # reads the header and checks the file covers it
                pass
        except (SafetensorError, OSError) as error:
            raise ModelError(
                f"{weights} is damaged ({first_line(error)}); copy or download it again, or set {key} to another model."
            ) from None


def _check_json_object(file: Path, key: str) -> None:
    if not file.exists():
        return
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
        problem = None if isinstance(content, dict) else f"it holds a JSON {type(content).__name__}, not an object"
    except (OSError, ValueError) as error:  # unreadable, not UTF-8 or not JSON
        problem = first_line(error)
    if problem is None and file.name == "config.json" and "model_type" not in content:
        problem = "it has no model_type, which names the architecture"
    if problem is not None:
        raise ModelError(
            f"{file} is not a valid model file ({problem}); put back the model's own {file.name}, or "
            f"set {key} to another model."
        )


def _check_tokenizer_file(file: Path, key: str) -> None:
    if not file.is_file():
        return
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(file))
    except Exception as error:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ModelError(
            f"{file} is not a valid tokenizer file ({first_line(error)}); put back the model's own "
            f"tokenizer.json, or set {key} to another model."
        ) from None


# GPT-2's "gelu_new" (and "gelu_fast") is the tanh approximation of GELU written as a chain of elementwise
# operations; "gelu_pytorch_tanh" is the same function in one fused kernel, equal up to float rounding. Elementwise
# passes are memory-bound, so on a CPU they are a large share of a step: the models here always use the fused one.
FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh", "gelu_fast": "gelu_pytorch_tanh"}


def with_fused_activation(config: PretrainedConfig) -> PretrainedConfig:
    activation = getattr(config, "activation_function", None)
    if activation in FUSED_ACTIVATIONS:
        config.activation_function = FUSED_ACTIVATIONS[activation]
    return config


def load_teacher(name: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The teacher, frozen: eval mode (no dropout) and no parameter requires a gradient."""
    teacher = _load_pretrained(name, "teacher", dtype)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def build_student(
    teacher_config: PretrainedConfig,
    nb_layers: int,
    pretrained: str | None = None,
    vocab_size: int | None = None,
) -> PreTrainedModel:
    """The student: a pretrained model when `pretrained` names one, else the untrained truncated teacher.

    The untrained truncated student is the "untrained truncated distilgpt2" of the original project's README: the
    teacher's config (for GPT-2 that is GPT-2's config) with `nb_layers` layers, randomly initialised, and
    `vocab_size` rows (the tokenizer's tokens; None keeps the teacher's). A teacher with rows beyond its tokenizer's
    tokens (the original's has 50260 for GPT-2's 50257) gets no student rows that no token uses: the losses crop the
    teacher to the student. A pretrained student (the original's final code: distilgpt2) is cropped against alike.
    """
    # The student trains in float32 whatever its source holds (mixed precision is autocast's): a 16-bit teacher's
    # config, or a checkpoint saved in 16 bits, would otherwise give 16-bit weights and optimizer states.
    if pretrained is not None:
        return _load_pretrained(pretrained, "student", torch.float32)
    _check_layer_count(nb_layers, teacher_config.num_hidden_layers)
    student_config = with_fused_activation(teacher_config.__class__.from_dict(teacher_config.to_dict()))
    student_config.num_hidden_layers = nb_layers
    if vocab_size is not None:
        student_config.vocab_size = vocab_size
    student_config.dtype = torch.float32  # what its checkpoints' config.json says
    return AutoModelForCausalLM.from_config(student_config, dtype=torch.float32)


def uniform_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """`student_layers` teacher block indices evenly spaced from the teacher's first block to its last.

    Student block i gets teacher block round(i * (L - 1) / (n - 1)), halves rounded up, so 12 -> 6 gives
    [0, 2, 4, 7, 9, 11] (Hugging Face's distilgpt2 choice). A one-layer student gets [0]: like the teacher's first
    block it reads the embeddings themselves, whereas a later block expects the output of the blocks before it.
    """
    _check_layer_count(student_layers, teacher_layers)
    if student_layers == 1:
        return [0]
    span, steps = teacher_layers - 1, student_layers - 1
    # Integer arithmetic: exact, and halves round up (Python's round() would round them to even).
    return [(2 * index * span + steps) // (2 * steps) for index in range(student_layers)]


def _check_layer_count(student_layers: int, teacher_layers: int) -> None:
    if not 1 <= student_layers <= teacher_layers:
        raise ModelError(
            f"distilled_model.nb_layers is {student_layers}, but the teacher has {teacher_layers} layers; "
            f"choose a value from 1 to {teacher_layers}."
        )


def student_init_layers(
    init: str, teacher_layers_config: list[int] | None, teacher_layer_count: int, student_layer_count: int
) -> list[int] | None:
    """The teacher block to copy into each student layer for `student.init`, or None for random weights."""
    if init == "random":
        return None
    if init == "uniform":
        return uniform_layers(teacher_layer_count, student_layer_count)
    if init != "teacher_layers":
        raise ModelError(f"student.init is {init!r}; use random, uniform or teacher_layers.")
    check_one_block_per_layer(teacher_layers_config or [], student_layer_count)
    _check_teacher_blocks(teacher_layers_config, teacher_layer_count)
    return list(teacher_layers_config)


def check_one_block_per_layer(layers: list[int], student_layer_count: int) -> None:
    """`student.teacher_layers` names the teacher block of each student layer: as many as the student has."""
    problem = one_block_per_layer_problem(layers, student_layer_count)
    if problem is not None:
        raise ModelError(problem)


def initialise_from_teacher(student: PreTrainedModel, teacher: PreTrainedModel, layers: list[int]) -> list[str]:
    """Copy the teacher's weights into the student, student block j from teacher block `layers[j]`.

    Every other tensor (embeddings, final norm, head) must exist in the teacher under the same name and shape. All
    is checked before anything is copied, so a refusal leaves the student as it was. Tied weights stay tied: each
    tensor is copied into the student's own parameter. Returns (and logs) what was copied, in words.
    """
    prefix = _blocks_prefix(student, "student")
    student_layer_count = len(student.get_submodule(prefix))
    check_one_block_per_layer(layers, student_layer_count)
    try:
        teacher_blocks = teacher.get_submodule(prefix)
    except AttributeError:
        teacher_blocks = None
    if not isinstance(teacher_blocks, torch.nn.ModuleList):
        raise ModelError(
            f"the teacher has no list of blocks at {prefix}, where the student has its; initialise only a student "
            f"built from the teacher's config, or set student.init to random."
        )
    _check_teacher_blocks(layers, len(teacher_blocks))

    teacher_state = teacher.state_dict()
    targets = student.state_dict(keep_vars=True)
    vocabulary_tensors = _vocabulary_tensor_names(student)
    sources = {}
    for name, target in targets.items():
        source_name = _teacher_name(name, prefix, layers)
        source = teacher_state.get(source_name)
        if source is None:
            raise ModelError(
                f"the student's {name} has no counterpart {source_name} in the teacher; initialise only a student "
                f"built from the teacher's config, or set student.init to random."
            )
        if name in vocabulary_tensors and source.shape[1:] == target.shape[1:] and len(source) > len(target):
            source = source[: len(target)]  # the teacher's rows beyond the tokenizer's tokens, as the losses crop them
        if source.shape != target.shape:
            raise ModelError(
                f"the student's {name} has shape {tuple(target.shape)} but the teacher's {source_name} has "
                f"{tuple(source.shape)}; initialise only a student of the teacher's width and vocabulary, or set "
                f"student.init to random."
            )
        sources[name] = source
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(sources[name].to(device=target.device, dtype=target.dtype))

    copied = _describe_copy(student, prefix, layers)
    logger.info("Student initialised from the teacher: %s", "; ".join(copied))
    return copied


def _vocabulary_tensor_names(model: PreTrainedModel) -> set[str]:
    """The state-dict names of the token embedding's and the output head's weights (one row per token)."""
    owners = [module for module in (model.get_input_embeddings(), model.get_output_embeddings()) if module is not None]
    return {
        name
        for name, tensor in model.state_dict(keep_vars=True).items()
        if any(tensor is owner.weight for owner in owners)
    }


def _check_teacher_blocks(layers: list[int], teacher_layer_count: int) -> None:
    for index in layers:
        if not 0 <= index < teacher_layer_count:
            raise ModelError(
                f"teacher block {index} does not exist: the teacher has {teacher_layer_count} blocks; list blocks "
                f"from 0 to {teacher_layer_count - 1} in student.teacher_layers."
            )


def _blocks_prefix(model: PreTrainedModel, role: str) -> str:
    """The name of the model's list of transformer blocks (`transformer.h` for GPT-2)."""
    layer_count = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layer_count:
            return name
    raise ModelError(
        f"the {role} ({type(model).__name__}) has no list of {layer_count} blocks to map onto the teacher's; "
        f"set student.init to random."
    )


def _teacher_name(student_name: str, prefix: str, layers: list[int]) -> str:
    """`<prefix>.<j>.rest` -> `<prefix>.<layers[j]>.rest`; names outside the blocks are the same in both models."""
    if not student_name.startswith(prefix + "."):
        return student_name
    block, _, rest = student_name[len(prefix) + 1 :].partition(".")
    return f"{prefix}.{layers[int(block)]}.{rest}"


def _describe_copy(student: PreTrainedModel, prefix: str, layers: list[int]) -> list[str]:
    head = student.get_output_embeddings()
    input_embeddings = student.get_input_embeddings()
    owners = dict.fromkeys(
        name.rpartition(".")[0] for name in student.state_dict() if not name.startswith(prefix + ".")
    )
    embeddings, norms, others = [], [], []
    for owner in owners:
        module = student.get_submodule(owner)
        if module is head:
            continue
        if isinstance(module, torch.nn.Embedding):
            embeddings.append(owner)
        elif "norm" in type(module).__name__.lower():
            norms.append(owner)
        else:
            others.append(owner)
    copied = []
    if embeddings:
        copied.append(f"embeddings ({', '.join(embeddings)})")
    copied.append(
        "blocks " + ", ".join(f"{student_block}<-{teacher_block}" for student_block, teacher_block in enumerate(layers))
    )
    if norms:
        copied.append(f"{'final norm' if len(norms) == 1 else 'norms'} ({', '.join(norms)})")
    if others:
        copied.append(f"other weights ({', '.join(others)})")
    if head is not None:
        tied = input_embeddings is not None and head.weight is input_embeddings.weight
        copied.append("output head (tied to the embeddings)" if tied else "output head")
    return copied


def check_compatible(
    tokenizer, student_config: PretrainedConfig, teacher_config: PretrainedConfig | None, student_tokenizer=None
) -> None:
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


def max_positions(model_config: PretrainedConfig) -> int | None:
    return getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)


def same_tokenizer(first, second) -> bool:
    return first.get_vocab() == second.get_vocab() and first.eos_token_id == second.eos_token_id


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


ROLE_KEYS = {"teacher": "teacher.name", "student": "student.pretrained"}


def _load_pretrained(name: str, role: str, dtype: torch.dtype | None) -> PreTrainedModel:
    key = ROLE_KEYS[role]
    try:
        config = with_fused_activation(AutoConfig.from_pretrained(name))
        model = AutoModelForCausalLM.from_pretrained(name, config=config, dtype=dtype)
    except (OSError, ValueError, SafetensorError) as error:
        raise _load_error(f"the {role} model", name, key, error) from None
    _check_weights_fit(model, name, key)
    return model


def _check_weights_fit(model: PreTrainedModel, name: str, key: str) -> None:
    """Refuse a local model whose weight files share no tensor name with the model its config.json builds (a
    config.json of another architecture): transformers would only warn, and leave every weight random."""
    directory = Path(name).expanduser()
    files = sorted(directory.glob("*.safetensors")) if directory.is_dir() else []
    if not files:
        return
    prefix = f"{model.base_model_prefix}."
    stored = set()
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            stored.update(tensor.removeprefix(prefix) for tensor in weights.keys())
    expected = {tensor.removeprefix(prefix) for tensor in model.state_dict()}
    if stored and not stored & expected:
        raise ModelError(
            f"the weights in {name} do not fit its config.json (model_type {model.config.model_type}): none of their "
            f"tensors, e.g. {min(stored)}, is one of that model's, so all would be random; put back the config.json "
            f"that came with the weights, or set {key} to another model."
        )


def model_inputs(batch: dict) -> dict:
    """What a model call takes from a batch: packed batches add position ids (and a 4-D attention mask)."""
    names = ("input_ids", "attention_mask", "position_ids")
    # No key/value cache: it is only for generation, and building it costs a copy per layer.
    return {"use_cache": False, **{name: batch[name] for name in names if name in batch}}


class HiddenStates(torch.nn.Module):
    """A causal LM whose call returns its last hidden states `(B, T, d)` instead of its logits.

    A criterion that projects hidden states to the vocabulary itself reads these. Accelerate prepares this wrapper
    rather than the model, so that under DDP the forward pass still goes through the DDP module and gradients are
    reduced.
    """

    def __init__(self, language_model: torch.nn.Module) -> None:
        super().__init__()
        self.language_model = language_model

    def forward(self, **inputs) -> torch.Tensor:
        return self.language_model.base_model(**inputs).last_hidden_state


def build_models(config, criterion, teacher_dtype: torch.dtype):
    """Tokenizer, teacher (frozen; None for plain training or a cached teacher) and student, checked against each
    other, the criterion and the config."""
    pretrained_student = config.student.pretrained
    uses_teacher = pretrained_student is None or criterion.requires_teacher
    if pretrained_student is not None:
        check_model_directory(pretrained_student, "student.pretrained")
    if uses_teacher:
        check_model_directory(config.teacher.name, "teacher.name")
    tokenizer = (
        load_tokenizer(config.teacher.name)
        if uses_teacher
        else load_tokenizer(pretrained_student, "student.pretrained")
    )
    # With a cached teacher, the teacher's weights are only loaded if the cache must be built (after the data).
    loads_teacher = criterion.requires_teacher and config.teacher.cache_top_k is None
    teacher = load_teacher(config.teacher.name, teacher_dtype) if loads_teacher else None
    if teacher is not None:
        teacher_config = teacher.config
    elif uses_teacher:
        teacher_config = load_model_config(config.teacher.name)  # its shape only, no weights
    else:
        teacher_config = None
    student = build_student(teacher_config, config.distilled_model.nb_layers, pretrained_student, len(tokenizer))
    if pretrained_student is None and config.student.init != "random":
        layers = student_init_layers(
            config.student.init,
            config.student.teacher_layers,
            teacher_config.num_hidden_layers,
            student.config.num_hidden_layers,
        )
        # Copied from float32 weights (a 16-bit teacher, or none at all for plain training and a cached teacher,
        # is loaded again here for the copy only).
        has_float32 = teacher is not None and teacher.dtype == torch.float32
        initialise_from_teacher(
            student, teacher if has_float32 else load_teacher(config.teacher.name, torch.float32), layers
        )
    student_tokenizer = (
        load_tokenizer(pretrained_student, "student.pretrained") if pretrained_student and teacher else None
    )
    check_compatible(
        tokenizer, student.config, teacher_config if criterion.requires_teacher else None, student_tokenizer
    )
    _check_against_config(config, criterion, student, teacher, teacher_config)
    return tokenizer, teacher, student


def _check_against_config(config, criterion, student: PreTrainedModel, teacher, teacher_config) -> None:
    """The loss's hidden-state term needs models of one width; the cached teacher's K most likely tokens are at most
    the vocabulary; data.max_length must fit both models' positions."""
    if criterion.compares_hidden_states and teacher_config.hidden_size != student.config.hidden_size:
        raise ModelError(
            f"the loss's hidden_weight aligns the last hidden states, but the teacher's are {teacher_config.hidden_size} "
            f"wide and the student's {student.config.hidden_size}; set hidden_weight to 0 or use models of one width."
        )
    top_k, vocabulary = config.teacher.cache_top_k, student.config.vocab_size
    if top_k is not None and criterion.requires_teacher and top_k > vocabulary:
        raise ModelError(
            f"teacher.cache_top_k is {top_k} but the student's vocabulary has {vocabulary} tokens; set "
            f"teacher.cache_top_k to at most {vocabulary}."
        )
    for role, model in (("student", student), ("teacher", teacher)):
        positions = max_positions(model.config) if model is not None else None
        if positions is not None and config.data.max_length > positions:
            raise ModelError(
                f"data.max_length is {config.data.max_length} but the {role} has {positions} positions; "
                f"set data.max_length to at most {positions}."
            )
