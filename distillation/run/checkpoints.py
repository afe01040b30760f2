"""Checkpoints: nothing a user trained is ever overwritten, and a stopped run can continue.

A run lives in `<paths.checkpoints>/<run name>/` (runs.py). Inside it, the last and the best checkpoints are Hugging Face model
directories (config.json, generation_config.json, model.safetensors, tokenizer files with the prompt format as a chat
template) that `AutoModelForCausalLM.from_pretrained` and `pipeline("text-generation", ...)` load,
plus what resuming needs: `trainer_state.json` (plain JSON: epoch, position in the epoch, step, best validation loss)
and `training_state.pt` (optimizer, scheduler and RNG states, read back with `torch.load(weights_only=True)`, which
runs no code from the file). The optimizer state is keyed by parameter name, whole (never sharded), so a checkpoint
resumes with any number of processes, with or without FSDP. A checkpoint is written to a hidden staging folder and renamed into place, so a crash
during a write leaves the previous checkpoint whole (storage.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shlex
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from distillation.base.errors import UserError, first_line
from distillation.base.storage import atomic_directory, is_disk_full
from distillation.run.identity import resume_problem

TRAINER_STATE_FILE = "trainer_state.json"
TRAINING_STATE_FILE = "training_state.pt"
WEIGHTS_FILE = "model.safetensors"

logger = logging.getLogger("distill")


class CheckpointError(UserError):
    """A checkpoint or run directory that cannot be used as asked; the message is shown to the user as it is."""


@dataclass
class TrainerState:
    """Where training stands. `batches_done_in_epoch` counts micro-batches, the data position to resume from."""

    epoch: int = 0
    batches_done_in_epoch: int = 0
    global_step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    best_validation_loss: float | None = None
    best_validation_perplexity: float | None = None
    best_step: int | None = None
    # The best checkpoint's ROUGE-L (training_parameters.generation_prompts > 0; absent from older checkpoints).
    best_validation_rouge_l: float | None = None
    last_evaluated_step: int | None = None
    skipped_batches: int = 0
    # Loss, kd and ce summed over the micro-batches since the last log step, and their count.
    interval_sums: list | None = None
    # Seconds of the run up to this checkpoint, over every process that worked on it (resumes add theirs).
    elapsed_s: float = 0.0

    def record_validation(self, result: dict, best_metric: str) -> bool:
        """Note a validation at this step; True when its result is the best so far by `best_metric` (then kept)."""
        self.last_evaluated_step = self.global_step
        if best_metric == "perplexity":
            improved = self.best_validation_perplexity is None or result["perplexity"] < self.best_validation_perplexity
        elif best_metric == "rouge_l":  # higher is better
            improved = self.best_validation_rouge_l is None or result["rouge_l"] > self.best_validation_rouge_l
        else:
            improved = self.best_validation_loss is None or result["loss"] < self.best_validation_loss
        if improved:
            self.best_validation_loss, self.best_step = result["loss"], self.global_step
            self.best_validation_perplexity = result["perplexity"]
            self.best_validation_rouge_l = result.get("rouge_l")
        return improved


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP shards the model's parameters over the processes (each holds a slice of every weight)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gather_training_states(model: torch.nn.Module, optimizer) -> tuple[dict | None, dict]:
    """The model's whole weights and the optimizer state keyed by parameter name, for a checkpoint.

    A sharded model's states are gathered from every process onto the main one (so every process must call this);
    for an unsharded model the weights are None: `save_pretrained` reads them from the model itself.
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)  # inside Accelerate's wrapper
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        whole_on_main = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=whole_on_main)
        # Gathered, a tied head is a copy of the embedding; stored once, as save_pretrained does for a plain model.
        weights = {key: tensor for key, tensor in weights.items() if not _is_tied(model, key)}
        return weights, get_optimizer_state_dict(model, optimizer, options=whole_on_main)
    return None, _keyed_by_name(optimizer.state_dict(), _parameter_names(model, optimizer))


def _parameter_names(model: torch.nn.Module, optimizer) -> list[str]:
    """Each optimized parameter's name, in the optimizer's order (the indices of its own state_dict)."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def _keyed_by_name(optimizer_state: dict, names: list[str]) -> dict:
    return {
        "state": {names[index]: values for index, values in optimizer_state["state"].items()},
        "param_groups": [
            {**group, "params": [names[index] for index in group["params"]]}
            for group in optimizer_state["param_groups"]
        ],
    }


def _keyed_by_index(optimizer_state: dict, names: list[str]) -> dict:
    index = {name: position for position, name in enumerate(names)}
    return {
        "state": {index[name]: values for name, values in optimizer_state["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]} for group in optimizer_state["param_groups"]
        ],
    }


class RunCheckpoints:
    """The last and the best checkpoints of a run's student, its optimizer and its schedule: every process takes
    part in a save (a sharded model's states are gathered from all of them) and the main process writes it; a
    resume reads the last one back. `identity` (identity.run_identity) is what a resume must share with the config."""

    def __init__(
        self, run_directory: Path, training, model, tokenizer, optimizer, scheduler, accelerator, identity: dict
    ) -> None:
        self.last = run_directory / training.checkpoints_name_last
        self.best = run_directory / training.checkpoints_name_best
        self.model, self.tokenizer, self.optimizer, self.scheduler = model, tokenizer, optimizer, scheduler
        self.accelerator, self.identity = accelerator, identity
        self.last_saved_step: int | None = None

    def save(self, directory: Path, state: TrainerState) -> None:
        weights, optimizer_state = gather_training_states(self.model, self.optimizer)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_checkpoint(
                directory,
                self.model,
                self.tokenizer,
                optimizer_state,
                self.scheduler,
                state,
                self.identity,
                self.accelerator.scaler,
                weights,
            )
        self.accelerator.wait_for_everyone()  # no process reads a checkpoint (the best, for the test) mid-write

    def keep_step_copy(self, step: int, keep: int) -> None:
        """A `step-<N>` copy of the last checkpoint, the newest `keep` of them kept (see keep_step_snapshot)."""
        if self.accelerator.is_main_process:
            keep_step_snapshot(self.last, step, keep, self.best.name)

    def restore(self) -> TrainerState:
        """The state of the last checkpoint, whose weights and training state are loaded (reading only: nothing
        is written before the run directory)."""
        state = load_trainer_state(self.last, self.identity)
        if not check_best(self.best) and state.best_step is not None:
            logger.warning(
                "The best checkpoint %s is missing: the best validation from now on will be kept there", self.best
            )
            state.best_validation_loss = state.best_validation_perplexity = state.best_step = None
            state.best_validation_rouge_l = None
            state.last_evaluated_step = None  # a complete run validates once more, to have a best to test
        self.last_saved_step = state.global_step
        load_model_weights(self.last, self.model)
        load_training_state(self.last, self.model, self.optimizer, self.scheduler, self.accelerator.scaler)
        logger.info(
            "Resumed from %s: epoch %d, step %d, %d batches into the epoch",
            self.last,
            state.epoch + 1,
            state.global_step,
            state.batches_done_in_epoch,
        )
        return state


def set_generation_defaults(tokenizer, model, chat_template: str | None, max_length: int) -> None:
    """What every checkpoint carries so that `pipeline("text-generation", model=checkpoint)` prompts the student as it
    was trained and stops at its end: `chat_template`, the one that rendered the training text
    (`dataset.training_chat_template`; None keeps the tokenizer's own, if any) and a greedy generation config with
    the tokenizer's EOS and pad tokens. Neither changes how a text is tokenized."""
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    from transformers import GenerationConfig

    # A response is at most what the student saw whole in training, and leaves room for a prompt of as much.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=min(256, max(max_length // 2, 1)),
    )


def save_checkpoint(
    directory: Path,
    model,
    tokenizer,
    optimizer_state: dict,
    scheduler,
    state: TrainerState,
    identity: dict,
    scaler=None,
    weights: dict | None = None,
) -> None:
    """Write a complete checkpoint to a staging folder, then swap it in: the old one stays until the new is whole.

    `optimizer_state` and `weights` come from `gather_training_states`. `identity` describes what was trained (model
    shape, tokenizer, loss); a resume checks it against the config.
    """
    try:
        with atomic_directory(directory, replace=True) as staging:
            if weights is None:
                model.save_pretrained(staging, safe_serialization=True)
            else:
                model.save_pretrained(staging, safe_serialization=True, state_dict=weights)
            tokenizer.save_pretrained(staging)
            training_state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": _rng_states()}
            if scaler is not None:
                training_state["scaler"] = scaler.state_dict()
            # Through a Python file, so that a full disk raises an OSError that says so (not only a RuntimeError).
            with open(staging / TRAINING_STATE_FILE, "wb") as handle:
                torch.save(training_state, handle)
            record = {**dataclasses.asdict(state), "identity": identity}
            (staging / TRAINER_STATE_FILE).write_text(json.dumps(record, indent=2))
    except Exception as error:
        if is_disk_full(error):
            raise CheckpointError(
                f"the disk is full: the checkpoint {directory} could not be written, and the previous one there is "
                f"intact; free some space and continue with --resume --run-name {shlex.quote(directory.parent.name)}."
            ) from None
        raise


def keep_step_snapshot(last: Path, step: int, keep: int, best_name: str) -> None:
    """Copy the last checkpoint to `step-<N>` (hard links: no extra disk) and delete all but the newest `keep` such
    copies. Only `step-<8 digits>` folders are ever deleted, never the last or the best checkpoint, whatever their
    names."""
    snapshot = last.with_name(f"step-{step:08d}")
    if not snapshot.exists():
        with atomic_directory(snapshot) as staging:  # a full disk or a kill leaves no half copy behind
            try:
                shutil.copytree(last, staging, dirs_exist_ok=True, copy_function=os.link)
            except OSError:  # a file system without hard links
                shutil.rmtree(staging)
                shutil.copytree(last, staging)
    snapshots = step_copies(last.parent, excluding=(last.name, best_name))
    for old in snapshots[: max(len(snapshots) - keep, 0)]:
        shutil.rmtree(old)


def step_copies(run_directory: Path, excluding: tuple[str, ...] = ()) -> list[Path]:
    """The run's `step-<8 digits>` copies (keep_step_checkpoints), oldest first; a last or best checkpoint whose
    configured name looks like one is given in `excluding`."""
    return sorted(
        path
        for path in run_directory.glob("step-*")
        if re.fullmatch(r"step-\d{8}", path.name) and path.name not in excluding
    )


def load_trainer_state(directory: Path, identity: dict) -> TrainerState:
    """The trainer state of a checkpoint, once its identity is checked against the configured run's `identity`."""
    try:
        values = json.loads((directory / TRAINER_STATE_FILE).read_text())
        saved_identity = values.pop("identity", {})
        state = _checked_state(TrainerState(**values))
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"the training state in {directory / TRAINER_STATE_FILE} is unreadable ({first_line(error)}); "
            f"{_damaged_advice(directory)}"
        ) from None
    problem = resume_problem(directory, saved_identity, identity)
    if problem is not None:
        raise CheckpointError(problem)
    return state


def _damaged_advice(checkpoint: Path) -> str:
    """What to do about a damaged checkpoint: put back the run's newest good step copy, if it kept any."""
    copies = step_copies(checkpoint.parent, excluding=(checkpoint.name,))
    if copies:
        return (
            f"the checkpoint is damaged: move it away (mv {checkpoint} {checkpoint}.damaged), put the run's newest "
            f"step copy in its place (cp -a {copies[-1]} {checkpoint}) and resume again."
        )
    return (
        f"the checkpoint is damaged and the run kept no step copies: move it away "
        f"(mv {checkpoint} {checkpoint}.damaged) and start a new run."
    )


def check_best(directory: Path) -> bool:
    """On a resume, before any training: whether the best checkpoint is there (False: it was removed), refusing a
    damaged one now rather than when the test reads it at the end."""
    if not directory.exists():
        return False
    try:
        json.loads((directory / TRAINER_STATE_FILE).read_text())
        safetensors.torch.load_file(str(directory / WEIGHTS_FILE))
    except (OSError, ValueError, safetensors.SafetensorError) as error:
        raise CheckpointError(
            f"the best checkpoint {directory} is damaged ({first_line(error)}); move it away "
            f"(mv {directory} {directory}.damaged) and resume: the best validation after the resume becomes the best."
        ) from None
    return True


def _checked_state(state: TrainerState) -> TrainerState:
    """The saved state's values, of the types the loop counts with (a hand-edited or damaged file may hold others)."""
    hints = typing.get_type_hints(TrainerState)
    for field in dataclasses.fields(TrainerState):
        value, kinds = getattr(state, field.name), typing.get_args(hints[field.name]) or (hints[field.name],)
        if value is None and type(None) in kinds:
            continue
        if list in kinds:
            valid = (
                isinstance(value, list) and len(value) == 4 and all(isinstance(item, (int, float)) for item in value)
            )
        elif float in kinds:
            valid = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            valid = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        if not valid:
            raise ValueError(f"{field.name} is {value!r}")
    return state


def load_model_weights(directory: Path, model: torch.nn.Module) -> None:
    """Load the checkpoint's weights into the configured model, refusing a checkpoint of another shape."""
    try:
        weights = safetensors.torch.load_file(str(directory / WEIGHTS_FILE))
    except (OSError, safetensors.SafetensorError) as error:
        raise CheckpointError(
            f"the weights in {directory / WEIGHTS_FILE} are unreadable ({first_line(error)}); "
            f"{_damaged_advice(directory)}"
        ) from None
    expected = model.state_dict()
    mismatched = [
        f"{key} {tuple(weights[key].shape)} vs {tuple(tensor.shape)}"
        for key, tensor in expected.items()
        if key in weights and weights[key].shape != tensor.shape
    ]
    tied = {key for key in expected if key not in weights and _is_tied(model, key)}
    missing = [key for key in expected if key not in weights and key not in tied]
    unexpected = [key for key in weights if key not in expected]
    if mismatched or missing or unexpected:
        details = (mismatched + [f"missing {key}" for key in missing] + [f"unexpected {key}" for key in unexpected])[:3]
        raise CheckpointError(
            f"the checkpoint in {directory} does not match the configured student ({'; '.join(details)}); "
            f"resume with the config that started this run."
        )
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # Each process keeps its own slice of the whole weights; a tied head comes with the embedding.
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(weights, strict=False)


def load_training_state(directory: Path, model, optimizer, scheduler, scaler=None) -> None:
    try:
        # weights_only: tensors and plain containers only; a pickle that would run code is refused.
        saved = torch.load(directory / TRAINING_STATE_FILE, weights_only=True, map_location="cpu")
        configured_rates = list(scheduler.base_lrs)
        _load_optimizer_state(model, optimizer, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        _continue_at_rates(scheduler, configured_rates)
        if scaler is not None and "scaler" in saved:
            scaler.load_state_dict(saved["scaler"])
    except Exception as error:  # an unpickling refusal, a truncated file or a mismatched optimizer
        raise CheckpointError(
            f"the optimizer state in {directory / TRAINING_STATE_FILE} cannot be used ({first_line(error)}); "
            f"it comes from another configuration, or {_damaged_advice(directory)}"
        ) from None
    _check_loaded_optimizer(directory, model, optimizer)
    _restore_rng_states(saved.get("rng", {}))


def _continue_at_rates(scheduler, configured_rates: list[float]) -> None:
    """Continue the saved schedule at its step with the configured learning rate as its peak: a resume may lower the
    rate (what a NaN loss asks for), where loading the states alone would bring back the saved one without a word.
    The schedules are LambdaLR's (transformers.get_scheduler): a step's rate is the peak times the schedule's factor."""
    if configured_rates == list(scheduler.base_lrs):
        return
    logger.warning(
        "Resuming with training_parameters.learning_rate %g (the checkpoint's was %g): the schedule goes on from its "
        "step at the new rate",
        configured_rates[0],
        scheduler.base_lrs[0],
    )
    scheduler.base_lrs = configured_rates
    groups = scheduler.optimizer.param_groups
    for group, factor, peak in zip(groups, scheduler.lr_lambdas, configured_rates, strict=True):
        group["initial_lr"], group["lr"] = peak, peak * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


def _check_loaded_optimizer(directory: Path, model: torch.nn.Module, optimizer) -> None:
    """torch loads the state of another optimizer, or of other shapes, without a word (the saved settings replace
    the configured ones), and fails only at the first step: SGD reads a momentum that AdamW's settings lack. Both
    are refused here, before the run writes anything."""
    inner = getattr(optimizer, "optimizer", optimizer)
    missing = sorted({key for group in inner.param_groups for key in inner.defaults if key not in group})
    if missing:
        raise CheckpointError(
            f"the optimizer state in {directory / TRAINING_STATE_FILE} is not {type(inner).__name__}'s, which "
            f"training_parameters.optimizer gives (its settings lack {', '.join(missing)}); set the optimizer back "
            f"to the one in the run's config.yaml, or start a new run without --resume."
        )
    names = {parameter: name for name, parameter in model.named_parameters()}
    for parameter, values in inner.state.items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != parameter.shape:
                raise CheckpointError(
                    f"the optimizer state in {directory / TRAINING_STATE_FILE} holds {key} of shape "
                    f"{tuple(value.shape)} for {names.get(parameter, 'a parameter')} {tuple(parameter.shape)}; "
                    f"{_damaged_advice(directory)}"
                )


def _load_optimizer_state(model: torch.nn.Module, optimizer, optimizer_state: dict) -> None:
    """Load a whole optimizer state keyed by parameter name into the optimizer of this run, whose parameters may be
    sharded over another number of processes."""
    inner = getattr(optimizer, "optimizer", optimizer)
    names = _parameter_names(model, inner)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, inner, optimizer_state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(_keyed_by_index(optimizer_state, names))


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    # save_pretrained stores a tied output head once, under the input embedding's name.
    output = getattr(model, "get_output_embeddings", lambda: None)()
    inputs = getattr(model, "get_input_embeddings", lambda: None)()
    return (
        output is not None and inputs is not None and output.weight is inputs.weight and key.endswith("lm_head.weight")
    )


def _rng_states() -> dict:
    numpy_state = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng_states(states: dict) -> None:
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        kind, keys, position, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
