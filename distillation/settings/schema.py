"""The config's schema: every key with its type, range and default, as frozen dataclasses, and the checks that
involve several keys. A key that a file does not set keeps the original project's meaning where it had one (see
config.py). Imports neither torch nor the layers above."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from distillation.base.errors import UserError
from distillation.settings import templates

REPORT_TO_CHOICES = ("auto", "none", "tensorboard", "wandb")
# The criterion of a file without training_parameters.loss: the original project's loss and values.
DEFAULT_LOSS = {"()": "loss.DistillationLoss", "alpha": 1.0, "beta": 0.1, "temperature": 1.0}


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
    cache_top_k: int | None = field(default=None, metadata=_range(1))


@dataclass(frozen=True)
class Student:
    # None: the untrained truncated teacher (teacher config, `distilled_model.nb_layers` layers, random weights).
    # Otherwise a Hub name or local directory of a pretrained causal LM, e.g. "distilgpt2".
    pretrained: str | None = None
    # Weights of the untrained truncated student: random, or the teacher's embeddings, final norm and head with
    # teacher blocks chosen evenly spaced (uniform: 12 -> 6 gives 0, 2, 4, 7, 9, 11, Hugging Face's distilgpt2
    # choice) or listed in teacher_layers (one per student layer, student block j <- teacher block teacher_layers[j]).
    init: Literal["random", "uniform", "teacher_layers"] = "random"
    teacher_layers: list[int] | None = field(default=None, metadata=_range(0))


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
    text_column: str | None = None
    # The prompt before the output: a name from templates.PROMPT_TEMPLATES (alpaca: Stanford Alpaca's, as the `text`
    # column of vicgalle/alpaca-gpt4 holds it) or a section {with_input: ..., without_input: ...} of format strings
    # with the fields {instruction} and {input}. Checked by templates.prompt_template; unused with a text_column.
    template: Any = "alpaca"
    max_length: int = field(default=1024, metadata=_range(2))
    split: Splits = field(default_factory=Splits)
    # Score only the response: the instruction part of an Alpaca sample is not a target for either loss term.
    mask_instruction: bool = False
    # Keep only the first N rows of the data set (before splitting), for quick experiments.
    max_samples: int | None = field(default=None, metadata=_range(1))
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
    max_steps: int | None = field(default=None, metadata=_range(1))
    optimizer: Literal["adamw", "sgd"] = "sgd"
    weight_decay: float = field(default=0.0, metadata=_range(0.0))
    momentum: float = field(default=0.0, metadata=_range(0.0, 1.0))
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = field(default=0, metadata=_range(0))
    # None disables clipping.
    max_grad_norm: float | None = field(default=None, metadata=_range(0.0, low_open=True))
    log_every_steps: int = field(default=10, metadata=_range(1))
    # Validation runs at the end of every epoch, and also every N optimizer steps when set.
    eval_every_steps: int | None = field(default=None, metadata=_range(1))
    # At each validation, the student's greedy continuations of this many validation prompts (the teacher's at the
    # first) go to samples.jsonl and the trackers; 0: none.
    sample_prompts: int = field(default=3, metadata=_range(0))
    # The last checkpoint is written at the end of every epoch, and also every N optimizer steps when set.
    checkpoint_every_steps: int | None = field(default=None, metadata=_range(1))
    # Also keep the checkpoints of the last N `checkpoint_every_steps` steps as step-<N> (0: only last and best).
    keep_step_checkpoints: int = field(default=0, metadata=_range(0))
    # A NaN or inf loss: `stop` (naming the last good checkpoint) or `skip` the batch (costs a sync per batch).
    on_nonfinite_loss: Literal["stop", "skip"] = "stop"
    checkpoints_name_last: str = "last"
    checkpoints_name_best: str = "best"
    # What makes the best checkpoint: the validation loss (the training objective), the student's validation
    # perplexity (its own next-token quality, comparable across losses), or the ROUGE-L of its greedy answers to the
    # generation prompts (what it writes; needs generation_prompts > 0).
    best_metric: Literal["loss", "perplexity", "rouge_l"] = "loss"
    # At each validation (and on the test split), the student's greedy answers to this many first prompts of the
    # split, scored: ROUGE-L F1 against the reference response, the teacher's per-token NLL of the answer, the mean
    # answer length and the share that ends in EOS (responses.max_new_tokens at most); 0: none.
    generation_prompts: int = field(default=0, metadata=_range(0))
    resume: bool = False
    # Where metrics also go: auto (TensorBoard when it is installed), none, tensorboard, wandb, or tensorboard,wandb.
    report_to: str = "auto"
    # The run's criterion (a loss.Criterion), as configue built it from the `()` entry (or as built here, the same
    # way, for an override or the default); distill.setup chooses how it runs.
    loss: Any = None


@dataclass(frozen=True)
class Responses:
    # Where each optimizer step's responses come from (GKD's names, docs/on-policy.md). With probability lmbda the
    # student's own samples of the step's prompts (on-policy distillation); otherwise, with seq_kd, the teacher's
    # generations (sequence-level KD), or else the data set's responses (supervised KD, the original's).
    lmbda: float = field(default=0.0, metadata=_range(0.0, 1.0))
    seq_kd: bool = False
    # The loss's CE term on the student's own samples: off, as in the papers (a student learns nothing from the
    # likelihood of what it wrote); the teacher's generations keep it (sequence-level KD is CE on them).
    ce_on_student_samples: bool = False
    # Generation: the most new tokens of a response (EOS included), and the sampling distribution (temperature 1
    # and no truncation: the student's own distribution, which the on-policy objectives are defined on).
    max_new_tokens: int = field(default=128, metadata=_range(1))
    temperature: float = field(default=1.0, metadata=_range(0.0, low_open=True))
    top_k: int | None = field(default=None, metadata=_range(1))
    top_p: float = field(default=1.0, metadata=_range(0.0, 1.0, low_open=True))

    @property
    def generates(self) -> bool:
        """Whether some steps train on generated responses (the student's samples or the teacher's generations)."""
        return self.lmbda > 0 or self.seq_kd


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
    model_id: str | None = None


@dataclass(frozen=True)
class Config:
    # Prefix of the run names; defaults to the config file's stem.
    name: str | None = None
    # numpy's seeding (the split, the batch order) takes 0 to 2**32 - 1.
    seed: int = field(default=42, metadata=_range(0, 2**32 - 1))
    paths: Paths = field(default_factory=Paths)
    teacher: Teacher = field(default_factory=Teacher)
    student: Student = field(default_factory=Student)
    distilled_model: DistilledModel = field(default_factory=DistilledModel)
    data: Data = field(default_factory=Data)
    training_parameters: TrainingParameters = field(default_factory=TrainingParameters)
    responses: Responses = field(default_factory=Responses)
    hardware: Hardware = field(default_factory=Hardware)
    hub: Hub = field(default_factory=Hub)


def check(config: Config, source: str) -> None:
    """The checks of a built config that involve several keys (or a key and the templates): ConfigError."""
    _check_student(config, source)
    split = config.data.split
    total = split.train + split.validation + split.test
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"{source}: data.split fractions sum to {total:g}; make train + validation + test equal 1.")
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
    _check_responses(config, source)
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


def one_block_per_layer_problem(layers: list[int], student_layer_count: int) -> str | None:
    """The sentence that refuses `student.teacher_layers` when it does not name one teacher block per student
    layer, or None."""
    if len(layers) == student_layer_count:
        return None
    return (
        f"student.teacher_layers lists {len(layers)} teacher blocks but distilled_model.nb_layers is "
        f"{student_layer_count}; list exactly one teacher block per student layer."
    )


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


def _check_responses(config: Config, source: str) -> None:
    responses, training = config.responses, config.training_parameters
    criterion = training.loss
    if training.best_metric == "rouge_l" and training.generation_prompts == 0:
        raise ConfigError(
            f"{source}: training_parameters.best_metric is rouge_l but generation_prompts is 0, so no answer is "
            f"scored; set generation_prompts to a number of prompts (e.g. 32) or best_metric to loss."
        )
    if not config.responses.generates:
        return
    fix = "or set responses.lmbda to 0 and responses.seq_kd to false"
    if not criterion.requires_teacher:
        raise ConfigError(
            f"{source}: responses.lmbda or responses.seq_kd asks for generated responses, but "
            f"{type(criterion).__name__} has no teacher to distil them from; use loss.DistillationLoss (alpha 0 and "
            f"beta 1 is sequence-level KD's plain CE on the teacher's generations) {fix}."
        )
    if config.teacher.cache_top_k is not None:
        raise ConfigError(
            f"{source}: teacher.cache_top_k caches the teacher on the data's responses, but responses.lmbda or "
            f"seq_kd trains on generated ones, which the teacher must score as they come; set teacher.cache_top_k "
            f"to null {fix}."
        )
    if config.data.text_column is not None:
        raise ConfigError(
            f"{source}: responses.lmbda or seq_kd generates responses to the data's prompts, but "
            f"data.text_column {config.data.text_column!r} holds whole texts without a prompt part; use data with "
            f"prompts (Alpaca fields, messages, prompt/completion or a prompt column) {fix}."
        )
    on_student_samples = responses.lmbda > 0 and not responses.ce_on_student_samples
    if on_student_samples and getattr(criterion, "alpha", 1) == 0 and getattr(criterion, "hidden_weight", 0) == 0:
        raise ConfigError(
            f"{source}: the loss's alpha is 0 and the CE term is off on the student's samples "
            f"(responses.ce_on_student_samples), so nothing would be learned on them; make alpha positive."
        )


def report_to_names(training: TrainingParameters) -> list[str]:
    """The tracker names that `training_parameters.report_to` lists, comma-separated."""
    return [name.strip() for name in training.report_to.split(",")]


def check_simple_name(value: str, what: str) -> None:
    """Names become directories under paths.checkpoints: refuse anything that could point elsewhere."""
    if not value or value in {".", ".."} or "/" in value or "\\" in value or value.startswith("."):
        raise ConfigError(f"{what} is {value!r}; use a plain name without '/', '\\' or a leading '.'.")


def key_table() -> str:
    """docs/configuration.md's table of every key with its type, range and default, in Markdown, written from the
    dataclasses above (a test keeps the page equal to it): `python3 -m distillation.settings.schema`."""
    rows = ["| key | type | default |", "|---|---|---|"]
    for key, kind, metadata, default in leaves():
        rows.append(f"| `{key}` | {_kind_text(kind, metadata)} | `{_yaml_text(default)}` |")
    return "\n".join(rows)


def leaves(section: type = Config, prefix: str = ""):
    """Every key of `section` (a whole config by default) that holds a value, not a section: (dotted key, type,
    range metadata, default)."""
    hints = typing.get_type_hints(section)
    for item in dataclasses.fields(section):
        kind = hints[item.name]
        if dataclasses.is_dataclass(kind):
            yield from leaves(kind, f"{prefix}{item.name}.")
            continue
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        if section is TrainingParameters and item.name == "loss":
            kind, default = "loss", ", ".join(f"{name}: {value}" for name, value in DEFAULT_LOSS.items())
        yield f"{prefix}{item.name}", kind, item.metadata, default


def _kind_text(kind: Any, metadata: typing.Mapping) -> str:
    if kind == "loss":
        return "a `()` entry naming a class of loss.py, with its arguments"
    arguments = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
        return f"{_kind_text(arguments[0], metadata)} or null"
    if typing.get_origin(kind) is Literal:
        return "one of " + ", ".join(f"`{choice}`" for choice in arguments)
    if typing.get_origin(kind) is list:
        return f"list of {_kind_text(arguments[0], metadata)}"
    low, high = metadata.get("low"), metadata.get("high")
    bounds = [f"> {low}" if metadata.get("low_open") else f">= {low}"] if low is not None else []
    bounds += [f"<= {high}"] if high is not None else []
    name = {bool: "true/false", int: "integer", float: "number", str: "text"}.get(kind, "text or section")
    return f"{name} {', '.join(bounds)}".strip()


def _yaml_text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


if __name__ == "__main__":
    print(key_table())
