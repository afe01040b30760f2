"""A run's identity: what a checkpoint records of the run that wrote it (`run_identity`), and what a resume must
share with it (`resume_problem`), so that a resumed run computes the run it continues.

It records the student's shape, the tokenizer, the loss, the teacher (the contents of its files, read whole:
file_identity.py), the settings that decide the updates (optimizer, weight decay, schedule and warm-up, the cached
teacher's K, where the responses come from and how they are sampled) and what fixes the batches whose position in
the epoch the checkpoint saved (the tokenized data, the seed, the batching). What may change on a resume: nb_epochs,
max_steps, the learning rate and max_grad_norm (a lower rate after a NaN loss), the processes (with
gradient_accumulation_steps), the hardware and precision, and what is only recorded or evaluated (logging,
validation, checkpoint intervals, the best metric, on_nonfinite_loss). A part that an older checkpoint did not
record is not checked.
"""

from __future__ import annotations

from pathlib import Path

import dataset
import models

SHAPE_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
# learning_rate and max_grad_norm may change: a resume applies them (checkpoints._continue_at_rates), and lowering
# them is what a NaN loss asks for.
UPDATE_KEYS = ("optimizer", "weight_decay", "lr_scheduler", "warmup_steps")
RESPONSES_KEYS = ("lmbda", "seq_kd", "ce_on_student_samples", "max_new_tokens", "temperature", "top_k", "top_p")


def run_identity(model_config, tokenizer, criterion, config, train_split) -> dict:
    """The identity of the configured run (see the module docstring), as plain JSON values."""
    return {
        "model": {key: getattr(model_config, key, None) for key in SHAPE_KEYS},
        "tokenizer": dataset.tokenizer_fingerprint(tokenizer),
        "loss": criterion.spec(),
        "teacher": models.model_identity(config.teacher.name) if criterion.requires_teacher else None,
        "settings": update_settings(config, criterion),
        "batches": {
            "data": dataset.tokenized_data_identity(train_split),
            "seed": config.seed,
            "training_parameters.batch_size": config.training_parameters.batch_size,
            "data.group_by_length": config.data.group_by_length,
            "data.packing": config.data.packing,
        },
    }


def update_settings(config, criterion) -> dict:
    """The settings that decide every update after a resume, by config key: a resume that took other ones would not
    continue the run it names (and torch would load the state of another optimizer)."""
    training = config.training_parameters
    settings = {f"training_parameters.{key}": getattr(training, key) for key in UPDATE_KEYS}
    if training.optimizer == "sgd":
        settings["training_parameters.momentum"] = training.momentum
    if criterion.requires_teacher:
        settings["teacher.cache_top_k"] = config.teacher.cache_top_k
    # Where the responses come from, and how they are drawn (settings that only a generating run reads).
    responses = config.responses
    for key in RESPONSES_KEYS if responses.generates else RESPONSES_KEYS[:2]:
        settings[f"responses.{key}"] = getattr(responses, key)
    return settings


def resume_problem(directory: Path, saved: dict, configured: dict) -> str | None:
    """The sentence that refuses to resume the checkpoint in `directory`, whose identity is `saved`, as the run whose
    identity is `configured`; None when they agree."""
    problem = _batches_problem(directory, saved.get("batches", {}), configured["batches"])
    if problem is not None:
        return problem
    for part, what in (("model", "model shape"), ("tokenizer", "tokenizer"), ("loss", "loss")):
        if part in saved and saved[part] != configured[part]:
            return (
                f"the checkpoint in {directory} was trained with another {what} ({_describe(saved[part])}) than the "
                f"config gives ({_describe(configured[part])}); resume with the config that started this run "
                f"(saved as config.yaml in the run directory)."
            )
    if "teacher" in saved and saved["teacher"] != configured["teacher"]:
        return (
            f"the checkpoint in {directory} was distilled from another teacher than teacher.name gives now (its "
            f"config.json or weights differ, even under the same name); put back the teacher it was trained with, "
            f"or start a new run without --resume."
        )
    for key, value in saved.get("settings", {}).items():
        if key in configured["settings"] and configured["settings"][key] != value:
            return (
                f"the checkpoint in {directory} was trained with {key} {value!r}, and the config gives "
                f"{configured['settings'][key]!r}; a resume continues the run as it was trained, so set it back (the "
                f"run's config.yaml has it), or start a new run without --resume."
            )
    return None


def _batches_problem(directory: Path, saved: dict, configured: dict) -> str | None:
    """A checkpoint saves how many of the epoch's batches are done: the same count of other batches is not a resume."""
    for key, value in saved.items():
        if key in configured and configured[key] != value:
            what = (
                "the tokenized data (data.dataset, template, text_column, max_length, split, max_samples or the "
                "seed's split)"
                if key == "data"
                else f"{key} {value!r}"
            )
            return (
                f"the checkpoint in {directory} was trained on {what}, and the config changes it "
                f"({'another data set' if key == 'data' else repr(configured[key])}); a resume continues the saved "
                f"epoch from its position in the same batches, so set it back (the run's config.yaml has it), or "
                f"start a new run without --resume."
            )
    return None


def _describe(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key}={item}" for key, item in value.items())
    return str(value)[:16]
