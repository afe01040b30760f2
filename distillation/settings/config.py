"""Load, override and validate the run configuration, once, at start-up.

The YAML file is read with configue (so its `()` syntax picks the loss class, as in the original project), command-line
`--set key.path=value` overrides are applied, and every value is checked against the schema below: unknown keys,
wrong types and out-of-range values each raise `ConfigError` with one sentence naming the key and the fix. The result
is a tree of frozen dataclasses that the rest of the program only reads.

A key that a file does not set keeps the original project's meaning where it had one (its teacher, data, prompt,
untrained truncated 6-layer student, 60/20/20 split, SGD at 0.001 without schedule or clipping, batches of 2 random
samples up to 1024 tokens, 10 epochs, float32 throughout), so the original's own config file (`configs/seed.yaml`)
runs its experiment on any machine; `config.yaml` sets its better choices explicitly.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from distillation.settings import config_guard, templates
from distillation.base import storage
from distillation.base.errors import UserError, first_line


class ConfigError(UserError):
    """A mistake in the configuration or the command line; its message is shown to the user as it is."""


def _range(low: float | None = None, high: float | None = None, *, low_open: bool = False) -> dict:
    return {"low": low, "high": high, "low_open": low_open}


@dataclass(frozen=True)
class Paths:
    data_folder: str = "data"
    token_dataset: str = "tokenized"
    checkpoints: str = "checkpoints"


@dataclass(frozen=True)
class Teacher:
    # A Hugging Face Hub name or a local directory (config.json, weights, tokenizer files). The original project's
    # teacher: GPT-2 fine-tuned on Alpaca-GPT4 (3 more vocabulary rows than its tokenizer has tokens; they are cropped).
    name: str = "vicgalle/gpt2-alpaca-gpt4"
    # Precision of the frozen teacher: float32 as the original project's; auto is bfloat16 where the device has
    # native bfloat16 (a recent GPU, an AMX CPU), else float32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    # K: distil against the teacher's K most likely next tokens (and the rest of its probability mass), computed once
    # and cached on disk (teacher_cache.py), so that runs after the first never load the teacher. None: the full
    # distribution, from the teacher at every step.
    cache_top_k: Optional[int] = field(default=None, metadata=_range(1))


@dataclass(frozen=True)
class Student:
    # None: the untrained truncated teacher (teacher config, `distilled_model.nb_layers` layers, random weights).
    # Otherwise a Hub name or local directory of a pretrained causal LM, e.g. "distilgpt2".
    pretrained: Optional[str] = None
    # Weights of the untrained truncated student: random, or the teacher's embeddings, final norm and head with
    # teacher blocks chosen evenly spaced (uniform: 12 -> 6 gives 0, 2, 4, 7, 9, 11, Hugging Face's distilgpt2
    # choice) or listed in teacher_layers (one per student layer, student block j <- teacher block teacher_layers[j]).
    init: Literal["random", "uniform", "teacher_layers"] = "random"
    teacher_layers: Optional[list[int]] = field(default=None, metadata=_range(0))


def _check_student(config: Config, source: str) -> None:
    """Cross-field checks of `student`; the teacher-dependent ones (an index past its last block) are in models."""
    student, nb_layers = config.student, config.distilled_model.nb_layers
    if student.init != "random" and student.pretrained is not None:
        raise ConfigError(
            f"{source}: student.init is {student.init!r} but student.pretrained is set, and a pretrained student "
            f"keeps its own weights; set student.init to random or student.pretrained to null."
        )
    if student.init != "teacher_layers" and student.teacher_layers is not None:
        raise ConfigError(
            f"{source}: student.teacher_layers is set but student.init is {student.init!r}; "
            f"set student.init to teacher_layers or student.teacher_layers to null."
        )
    if student.init != "teacher_layers":
        return
    if student.teacher_layers is None:
        raise ConfigError(
            f"{source}: student.init is teacher_layers but student.teacher_layers is null; list the teacher block "
            f"to copy into each student layer, e.g. [0, 2, 4, 7, 9, 11] for 6 layers from GPT-2's 12."
        )
    problem = one_block_per_layer_problem(student.teacher_layers, nb_layers)
    if problem is not None:
        raise ConfigError(f"{source}: {problem}")
    repeated = sorted({index for index in student.teacher_layers if student.teacher_layers.count(index) > 1})
    if repeated:
        raise ConfigError(
            f"{source}: student.teacher_layers lists teacher block {repeated[0]} more than once; "
            f"list each teacher block at most once."
        )


@dataclass(frozen=True)
class DistilledModel:
    nb_layers: int = field(default=6, metadata=_range(1))


@dataclass(frozen=True)
class Splits:
    train: float = field(default=0.6, metadata=_range(0.0, 1.0, low_open=True))
    validation: float = field(default=0.2, metadata=_range(0.0, 1.0, low_open=True))
    test: float = field(default=0.2, metadata=_range(0.0, 1.0, low_open=True))


@dataclass(frozen=True)
class Data:
    # A Hub data set name, or a local .json/.jsonl/.csv/.parquet/.txt file or a folder of them.
    dataset: str = "vicgalle/alpaca-gpt4"
    # None: build each sample from the Alpaca fields instruction/input/output with `template`; else take this column
    # as the whole text.
    text_column: Optional[str] = None
    # The prompt before the output: a name from templates.PROMPT_TEMPLATES (alpaca: Stanford Alpaca's, as the `text`
    # column of vicgalle/alpaca-gpt4 holds it) or a section {with_input: ..., without_input: ...} of format strings
    # with the fields {instruction} and {input}. Checked by templates.prompt_template; unused with a text_column.
    template: Any = "alpaca"
    max_length: int = field(default=1024, metadata=_range(2))
    split: Splits = field(default_factory=Splits)
    # Score only the response: the instruction part of an Alpaca sample is not a target for either loss term.
    mask_instruction: bool = False
    # Keep only the first N rows of the data set (before splitting), for quick experiments.
    max_samples: Optional[int] = field(default=None, metadata=_range(1))
    num_proc: int = field(default=1, metadata=_range(1))
    # Batch samples of similar lengths (in shuffled groups) so that little compute goes to padding; false: batches
    # of random samples, as the original's.
    group_by_length: bool = False
    # Pack each batch's samples into rows of max_length tokens (positions restart, attention stays per sample).
    packing: bool = False


@dataclass(frozen=True)
class TrainingParameters:
    learning_rate: float = field(default=1e-3, metadata=_range(0.0, low_open=True))
    nb_epochs: int = field(default=10, metadata=_range(1))
    batch_size: int = field(default=2, metadata=_range(1))
    gradient_accumulation_steps: int = field(default=1, metadata=_range(1))
    # Stop after this many optimizer steps in all (None: run all epochs).
    max_steps: Optional[int] = field(default=None, metadata=_range(1))
    optimizer: Literal["adamw", "sgd"] = "sgd"
    weight_decay: float = field(default=0.0, metadata=_range(0.0))
    momentum: float = field(default=0.0, metadata=_range(0.0, 1.0))
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = field(default=0, metadata=_range(0))
    # None disables clipping.
    max_grad_norm: Optional[float] = field(default=None, metadata=_range(0.0, low_open=True))
    log_every_steps: int = field(default=10, metadata=_range(1))
    # Validation runs at the end of every epoch, and also every N optimizer steps when set.
    eval_every_steps: Optional[int] = field(default=None, metadata=_range(1))
    # At each validation, the student's greedy continuations of this many validation prompts (the teacher's at the
    # first) go to samples.jsonl and the trackers; 0: none.
    sample_prompts: int = field(default=3, metadata=_range(0))
    # The last checkpoint is written at the end of every epoch, and also every N optimizer steps when set.
    checkpoint_every_steps: Optional[int] = field(default=None, metadata=_range(1))
    # Also keep the checkpoints of the last N `checkpoint_every_steps` steps as step-<N> (0: only last and best).
    keep_step_checkpoints: int = field(default=0, metadata=_range(0))
    # A NaN or inf loss: `stop` (naming the last good checkpoint) or `skip` the batch (costs a sync per batch).
    on_nonfinite_loss: Literal["stop", "skip"] = "stop"
    checkpoints_name_last: str = "last"
    checkpoints_name_best: str = "best"
    # What makes the best checkpoint: the validation loss (the training objective) or the student's validation
    # perplexity (its own next-token quality, comparable across losses).
    best_metric: Literal["loss", "perplexity"] = "loss"
    resume: bool = False
    # Where metrics also go: auto (TensorBoard when it is installed), none, tensorboard, wandb, or tensorboard,wandb.
    report_to: str = "auto"
    # The run's criterion (a loss.Criterion), as configue built it from the `()` entry (or as built here, the same
    # way, for an override or the default); distill.setup chooses how it runs.
    loss: Any = None


@dataclass(frozen=True)
class Hardware:
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    # no: float32, as the original project trained; auto: bf16 autocast where the device has native bfloat16 (a
    # recent GPU; a CPU with AMX or AVX-512 BF16), else no.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "no"
    # torch.compile the student and teacher: faster steps once compiled, at a start-up cost of a minute or more.
    compile: bool = False
    # How several processes (torchrun, accelerate launch) hold the models: ddp (each process a whole copy) or fsdp
    # (FSDP2: the student's weights, gradients and optimizer states and the teacher's weights are sharded over the
    # processes, one unit per transformer block). One process ignores it.
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # fsdp: free each block's gathered weights after its forward pass and gather them again for the backward pass
    # (least memory, as ZeRO-3), or keep them until the backward pass (less communication, close to ZeRO-2).
    fsdp_reshard_after_forward: bool = True
    # fsdp: keep the sharded weights and optimizer states in CPU memory between uses (slower, for what does not fit).
    fsdp_cpu_offload: bool = False


@dataclass(frozen=True)
class Hub:
    # A Hugging Face Hub model repository (user/name, org/name, or name in the token's own namespace) that the best
    # checkpoint, its model card and loss curves are pushed to at the end of a run; needs a token (`hf auth login` or
    # HF_TOKEN). None: nothing is pushed (`python3 distill.py --push RUN_DIR --model-id ID` pushes a run later).
    model_id: Optional[str] = None


@dataclass(frozen=True)
class Config:
    # Prefix of the run names; defaults to the config file's stem.
    name: Optional[str] = None
    seed: int = 42
    paths: Paths = field(default_factory=Paths)
    teacher: Teacher = field(default_factory=Teacher)
    student: Student = field(default_factory=Student)
    distilled_model: DistilledModel = field(default_factory=DistilledModel)
    data: Data = field(default_factory=Data)
    training_parameters: TrainingParameters = field(default_factory=TrainingParameters)
    hardware: Hardware = field(default_factory=Hardware)
    hub: Hub = field(default_factory=Hub)


DEFAULT_LOSS = {"()": "loss.DistillationLoss", "alpha": 1.0, "beta": 0.1, "temperature": 1.0}


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read `path` with configue, apply `key.path=value` overrides, validate, and return the frozen Config."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass a YAML file with --config.")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file with --config.")
    raw = _read_with_configue(path)
    if raw is None:  # an empty file, or only comments: most likely a truncated or unsaved one
        raise ConfigError(f"config file {path} is empty; write its settings (config.yaml shows every section) or "
                          f"pass another file with --config.")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} holds a {type(raw).__name__}, not a mapping of sections; write its settings as "
                          f"sections (paths:, training_parameters:, ...) at the top level.")
    tree = _to_plain_tree(raw)
    for override in overrides:
        _apply_override(tree, override)
    tree.setdefault("name", path.stem)
    config = _build(Config, tree, str(path), "")
    _check_cross_field(config, str(path))
    return config


def to_plain_dict(config: Config) -> dict:
    """The resolved config as plain YAML-ready values, the loss back in configue's `()` form."""
    training = config.training_parameters
    plain = dataclasses.asdict(dataclasses.replace(config, training_parameters=dataclasses.replace(training, loss=None)))
    plain["training_parameters"]["loss"] = training.loss.spec()
    return plain


def dump_config(config: Config, path: Path) -> None:
    storage.atomic_write_text(path, yaml.safe_dump(to_plain_dict(config), sort_keys=False))


def _read_with_configue(path: Path) -> Any:
    import configue
    from configue.exceptions import ConfigueError

    try:
        config_guard.check_file(path)  # before configue runs anything the file names
        return configue.load(str(path))
    except config_guard.UnsafeConfig as error:
        raise ConfigError(str(error)) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save it as UTF-8.") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or first_line(error)
        raise ConfigError(f"{path} is not valid YAML{where} ({problem}); fix the syntax there.") from None
    except ConfigueError as error:
        raise ConfigError(
            f"{path}: {first_line(error)}; the `()` entry must name an existing class such as "
            f"loss.DistillationLoss or loss.ClassicLoss."
        ) from None
    except (TypeError, ValueError) as error:
        # Raised by a class constructor that configue called, e.g. the loss with a misspelt or invalid argument.
        raise ConfigError(
            f"{path}: training_parameters.loss: {_argument_problem(error)}; fix it under "
            f"training_parameters.loss."
        ) from None


def _argument_problem(error: Exception) -> str:
    """A criterion's TypeError or ValueError in plain words: "...got an unexpected keyword argument 'alpah'" names
    the argument."""
    text = str(error)
    if "unexpected keyword argument" in text:
        return f"unknown argument {text.rsplit(' ', 1)[-1]}"
    return text


def _is_criterion(value: Any) -> bool:
    """Whether `value` is a criterion that configue built (recognised by its `spec`, without importing loss.py)."""
    return callable(getattr(value, "spec", None))


def _to_plain_tree(value: Any) -> Any:
    """Turn the configue result into plain dicts and lists; the criterion that configue built stays as it is."""
    if isinstance(value, dict):
        return {key: _to_plain_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_plain_tree(item) for item in value]
    return value


def _apply_override(tree: dict, override: str) -> None:
    key_path, separator, text = override.partition("=")
    if not separator or not key_path:
        raise ConfigError(f"--set {override!r} must look like key.path=value, e.g. training_parameters.batch_size=8.")
    keys = key_path.split(".")
    _check_override_path(keys, key_path)
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if _is_criterion(child):  # one of its arguments changes: it is built again from its `()` form
            child = node[key] = child.spec()
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key_path}: {key} is a single value, not a section.")
        node = child
    try:
        node[keys[-1]] = yaml.safe_load(text) if text else None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or first_line(error)
        raise ConfigError(
            f"--set {key_path}: the value {text!r} is not valid YAML ({problem}); quote a text, e.g. "
            f"{key_path}='\"{text}\"', or fix the value."
        ) from None


def _check_override_path(keys: list[str], key_path: str) -> None:
    """Refuse unknown keys in --set, before they reach the tree (the loss accepts its own arguments)."""
    schema: Any = Config
    for depth, key in enumerate(keys):
        if schema is _LOSS_SECTION:
            if depth != len(keys) - 1:
                break
            return
        names = {item.name: item for item in dataclasses.fields(schema)}
        if key not in names:
            raise ConfigError(
                f"--set {key_path}: unknown key {'.'.join(keys[:depth + 1])}{_closest(key, names)}; "
                f"valid keys here are {', '.join(names)}."
            )
        schema = _field_schema(schema, names[key])
        if not dataclasses.is_dataclass(schema) and schema is not _LOSS_SECTION and depth != len(keys) - 1:
            raise ConfigError(f"--set {key_path}: {'.'.join(keys[:depth + 1])} is a single value, not a section.")
    if dataclasses.is_dataclass(schema):
        raise ConfigError(f"--set {key_path}: this is a section; set one of its keys instead.")


_LOSS_SECTION = object()
REPORT_TO_CHOICES = ("auto", "none", "tensorboard", "wandb")


def _field_schema(owner: type, item: dataclasses.Field) -> Any:
    if owner is TrainingParameters and item.name == "loss":
        return _LOSS_SECTION
    return typing.get_type_hints(owner)[item.name]


def _build(schema: type, values: Any, source: str, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the top level'} must be a section of keys, not {values!r}.")
    known = {item.name: item for item in dataclasses.fields(schema)}
    for key in values:
        if key not in known:
            hint = _closest(str(key), known)
            raise ConfigError(
                f"{source}: unknown key {prefix}{key}{hint}; valid keys here are {', '.join(known)}."
            )
    kwargs = {}
    for name, item in known.items():
        key = f"{prefix}{name}"
        kind = _field_schema(schema, item)
        if kind is _LOSS_SECTION:
            if name in values:
                kwargs[name] = _criterion(values[name], source, key)
        elif dataclasses.is_dataclass(kind):
            # A section the file leaves out is built too, so that training_parameters gets its default loss.
            kwargs[name] = _build(kind, values.get(name) if values.get(name) is not None else {}, source, f"{key}.")
        elif name in values:
            kwargs[name] = _check_value(values[name], kind, item.metadata, source, key)
    if schema is TrainingParameters and "loss" not in kwargs:
        kwargs["loss"] = _criterion(dict(DEFAULT_LOSS), source, f"{prefix}loss")
    return schema(**kwargs)


def _closest(key: str, known: dict) -> str:
    import difflib

    match = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {match[0]}?)" if match else ""


def _criterion(section: Any, source: str, key: str) -> Any:
    """The criterion of the loss section: the one configue built from the file, or one built from its `()` form
    (an override, the default) the way configue builds it, by importing the class it names, once checked."""
    if _is_criterion(section):
        return section
    if not isinstance(section, dict) or "()" not in section:
        raise ConfigError(
            f"{source}: {key}: the section needs a `()` entry naming the loss class, e.g. `(): loss.DistillationLoss` "
            f"with alpha, beta and temperature, or `(): loss.ClassicLoss`."
        )
    arguments = dict(section)
    class_path = config_guard.criterion_path(arguments.pop("()"))
    if class_path is None:
        raise ConfigError(f"{source}: {key}: {section['()']!r} is not a loss class; use loss.DistillationLoss or "
                          f"loss.ClassicLoss.")
    module_name, _, class_name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)(**arguments)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: {key}: {_argument_problem(error)}; fix it under {key}.") from None


def _check_value(value: Any, kind: Any, metadata: typing.Mapping, source: str, key: str) -> Any:
    origin = typing.get_origin(kind)
    arguments = typing.get_args(kind)
    if origin is typing.Union and type(None) in arguments:
        if value is None:
            return None
        kind = next(argument for argument in arguments if argument is not type(None))
        origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        if value is False and "no" in arguments:  # YAML 1.1 reads an unquoted `no` (as in `--set ...=no`) as false
            value = "no"
        if value not in arguments:
            choices = ", ".join(repr(choice) for choice in arguments)
            raise ConfigError(f"{source}: {key} is {value!r}; it must be one of {choices}.")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} is {value!r}; it must be a list, written [a, b, ...] in YAML.")
        # Each entry meets the field's type and range, e.g. a whole number at least 0.
        return [_check_value(entry, arguments[0], metadata, source, f"{key}[{index}]")
                for index, entry in enumerate(value)]
    converted = _convert(value, kind)
    if converted is None:
        raise ConfigError(f"{source}: {key} is {value!r}; it must be {_describe(kind)}.")
    low, high = metadata.get("low"), metadata.get("high")
    if low is not None and (converted < low or (metadata.get("low_open") and converted == low)):
        relation = "above" if metadata.get("low_open") else "at least"
        raise ConfigError(f"{source}: {key} is {value!r}; it must be {relation} {low}.")
    if high is not None and converted > high:
        raise ConfigError(f"{source}: {key} is {value!r}; it must be at most {high}.")
    return converted


def as_number(value) -> Optional[float]:
    """`value` as a float, or None when it is not a number. YAML 1.1 (configue, `--set`) reads `1e-1` as text, so a
    text that is a plain number counts; true and false do not."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _convert(value: Any, kind: type) -> Any:
    """The value as `kind`, or None when it is not one. YAML 1.1 reads `3e-4` as a string: accept it as a float."""
    if kind is bool:
        return value if isinstance(value, bool) else None
    if kind is int:
        if isinstance(value, bool):
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return None
    if kind is float:
        number = as_number(value)
        return number if number is not None and math.isfinite(number) else None
    if kind is str:
        return value if isinstance(value, str) and value.strip() else None
    return value


def _describe(kind: type) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a non-empty text"}.get(
        kind, kind.__name__
    )


def _check_cross_field(config: Config, source: str) -> None:
    _check_student(config, source)
    split = config.data.split
    total = split.train + split.validation + split.test
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(
            f"{source}: data.split fractions sum to {total:g}; make train + validation + test equal 1."
        )
    training = config.training_parameters
    if training.checkpoints_name_last == training.checkpoints_name_best:
        raise ConfigError(
            f"{source}: training_parameters.checkpoints_name_last and checkpoints_name_best are both "
            f"{training.checkpoints_name_last!r}; give them different names."
        )
    for key, value in (
        ("name", config.name),
        ("training_parameters.checkpoints_name_last", training.checkpoints_name_last),
        ("training_parameters.checkpoints_name_best", training.checkpoints_name_best),
    ):
        check_simple_name(value, f"{source}: {key}")
    trackers = report_to_names(training)
    unknown = [name for name in trackers if name not in REPORT_TO_CHOICES]
    if unknown or (len(trackers) > 1 and ({"auto", "none"} & set(trackers))):
        raise ConfigError(
            f"{source}: training_parameters.report_to is {training.report_to!r}; use auto, none, tensorboard, wandb "
            f"or tensorboard,wandb."
        )
    _check_template(config, source)
    if config.data.mask_instruction and config.data.text_column is not None:
        raise ConfigError(
            f"{source}: data.mask_instruction needs the Alpaca fields to find the response; "
            f"set data.text_column to null or mask_instruction to false."
        )
    _check_cached_teacher(config, source)
    if config.hub.model_id is not None:
        check_model_id(config.hub.model_id, f"{source}: hub.model_id")


def is_hub_repo_id(name: str) -> bool:
    """Whether `name` is written as a Hub repository name (user/name, org/name or name); says nothing of a local
    path of the same spelling."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_model_id(value: str, what: str) -> None:
    """A Hub repository name, checked before a run spends hours to reach the push."""
    if not is_hub_repo_id(value):
        raise ConfigError(
            f"{what} is {value!r}, which is not a Hub repository name; write it as user/name or org/name (letters, "
            f"digits, '-', '_' and '.', at most 96 characters)."
        )


def one_block_per_layer_problem(layers: list[int], student_layer_count: int) -> Optional[str]:
    """The sentence that refuses `student.teacher_layers` when it does not name one teacher block per student
    layer, or None."""
    if len(layers) == student_layer_count:
        return None
    return (f"student.teacher_layers lists {len(layers)} teacher blocks but distilled_model.nb_layers is "
            f"{student_layer_count}; list exactly one teacher block per student layer.")


def _check_template(config: Config, source: str) -> None:
    try:
        templates.prompt_template(config.data.template)
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None


def _check_cached_teacher(config: Config, source: str) -> None:
    criterion = config.training_parameters.loss
    if config.teacher.cache_top_k is None or not criterion.requires_teacher:
        return
    refusal = criterion.cached_teacher_refusal()
    if refusal is None and config.data.packing:
        refusal = "packed rows mix samples, whose cached positions cannot follow them; set data.packing to false"
    if refusal is not None:
        raise ConfigError(f"{source}: teacher.cache_top_k is set, but {refusal}, or teacher.cache_top_k to null.")


def report_to_names(training: TrainingParameters) -> list[str]:
    """The tracker names that `training_parameters.report_to` lists, comma-separated."""
    return [name.strip() for name in training.report_to.split(",")]


def check_simple_name(value: str, what: str) -> None:
    """Names become directories under paths.checkpoints: refuse anything that could point elsewhere."""
    if not value or value in {".", ".."} or "/" in value or "\\" in value or value.startswith("."):
        raise ConfigError(f"{what} is {value!r}; use a plain name without '/', '\\' or a leading '.'.")
