"""Distil a causal-LM teacher into a smaller student, or train the student alone, as config.yaml says.

    python3 distill.py                                   # ./config.yaml, a new run
    python3 distill.py --config configs/tiny.yaml --plain-baseline   # the offline demo: distilled and plain
    python3 distill.py --resume --run-name NAME          # continue a stopped run
    python3 distill.py --set training_parameters.batch_size=8 --set training_parameters.loss.temperature=2

Every run writes `<paths.checkpoints>/<run name>/`: config.yaml (resolved), train.log, metrics.jsonl, summary.json,
loss_curves.png, TensorBoard events, and the last and best checkpoints. A configuration or data mistake stops the
program with one sentence and exit code 2 before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import logging.handlers
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

import dataset
import models
import teacher_cache
from checkpoints import (
    CheckpointError,
    RunLocation,
    TrainerState,
    gather_training_states,
    keep_step_snapshot,
    load_model_weights,
    load_trainer_state,
    load_training_state,
    locate_run,
    save_checkpoint,
)
from config import Config, ConfigError, dump_config, load_config, report_to_names, to_plain_dict
from dataset import DataError
from loss import IGNORE_INDEX, agreement_with_cached_teacher, agreement_with_teacher, next_token_cross_entropy
from models import ModelError

logger = logging.getLogger("distill")

# Mistakes a user can fix: shown as one sentence, exit code 2.
USER_ERRORS = (ConfigError, ModelError, DataError, CheckpointError)
EXIT_USER_ERROR = 2
EXIT_NON_FINITE_LOSS = 3


class StoppedBySignal(Exception):
    def __init__(self, signal_number: int, step: int, checkpoint: Path) -> None:
        self.signal_number = signal_number
        super().__init__(
            f"stopped by {signal.Signals(signal_number).name} after step {step}; the checkpoint {checkpoint} holds it, "
            f"continue with --resume --run-name {checkpoint.parent.name}"
        )


class NonFiniteLoss(Exception):
    def __init__(self, step: int, checkpoint: Path, checkpoint_step: Optional[int]) -> None:
        last_good = f"the last good checkpoint is {checkpoint} (step {checkpoint_step})" if checkpoint_step is not None \
            else "no checkpoint was written yet"
        super().__init__(
            f"the loss became NaN or inf by step {step}, so training stopped without saving those weights; "
            f"{last_good}. Lower the learning rate or check the data, or set "
            f"training_parameters.on_nonfinite_loss: skip to skip such batches."
        )


class StopSignals:
    """While active, SIGINT and SIGTERM only ask the loop to stop after the current optimizer step and checkpoint.

    A second signal stops at once (the last checkpoint written stays valid).
    """

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *_exception) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, _frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = number
        logger.warning("Received %s: finishing this step, then writing a checkpoint", signal.Signals(number).name)


def run_identity(model_config, tokenizer, criterion) -> dict:
    """What a checkpoint must share with the config to be resumed: the model shape, the tokenizer, the loss."""
    shape_keys = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
    return {
        "model": {key: getattr(model_config, key, None) for key in shape_keys},
        "tokenizer": dataset.tokenizer_fingerprint(tokenizer),
        "loss": criterion.spec(),
    }


_KEPT_UNTIL_EXIT: list = []
PLAIN_LOSS_OVERRIDE = "training_parameters.loss={'()': loss.ClassicLoss}"


def main(argv: Optional[list[str]] = None) -> int:
    arguments = parse_arguments(argv)
    status, run = train(arguments.config, arguments.set, arguments.run_name, arguments.resume)
    if status == 0 and arguments.plain_baseline:
        # The same config, seed, data and steps, with plain next-token training: the comparison distillation needs.
        baseline = run.directory.parent / f"{run.name}-plain"
        resume = arguments.resume and baseline.exists()
        status, _ = train(arguments.config, [*arguments.set, PLAIN_LOSS_OVERRIDE], baseline.name, resume)
    end_processes(status)
    return status


def train(config_file: str, overrides: list[str], run_name: Optional[str], resume: bool):
    """One run, from the config to the tested best checkpoint: (exit status, its RunLocation or None)."""
    early_records = setup_console_logging()
    run = None
    try:
        config = load_config(config_file, overrides)
        processes = start_processes(config)
        run = decided_by_main_process(processes, lambda: locate_run(
            config.paths.checkpoints,
            config.name,
            run_name,
            resume or config.training_parameters.resume,
            config.training_parameters.checkpoints_name_last,
        ))
        accelerator = build_accelerator(config, run)
        tokenizer, teacher, student = build_models(config)
        with accelerator.main_process_first():  # the main process fills the tokenized-data cache, the others read it
            splits = dataset.prepare_splits(
                dataset.spec_from_config(config), tokenizer, config.paths.data_folder, config.paths.token_dataset,
                config.data.num_proc,
            )
        cached_teacher = prepare_teacher_cache(config, accelerator, tokenizer, student, splits)
        trainer = Trainer(config, run, accelerator, tokenizer, teacher, student, splits, cached_teacher)
        if accelerator.num_processes > 1:
            # Kept until end_processes: freeing DDP's reducer mid-process can wait forever on gloo's threads.
            _KEPT_UNTIL_EXIT.append(trainer)
        trainer.restore()
        start_run_directory(run, config, early_records, accelerator)
        start_trackers(accelerator, config, trainer.state)
        trainer.fit()
        trainer.test_best()
        report_where(run, accelerator)
    except USER_ERRORS as error:
        logger.error("error: %s", error)
        return EXIT_USER_ERROR, run
    except StoppedBySignal as stop:
        logger.error("%s", stop)
        return 128 + stop.signal_number, run
    except NonFiniteLoss as error:
        logger.error("error: %s", error)
        return EXIT_NON_FINITE_LOSS, run
    except KeyboardInterrupt:
        logger.error("interrupted; the last checkpoint written is kept, continue with --resume")
        return 130, run
    finally:
        close_log_handlers()
    return 0, run


def parse_arguments(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="config.yaml", help="YAML configuration file (default: ./config.yaml)")
    parser.add_argument("--run-name", help="name of the run directory (default: <config name>-<timestamp>)")
    parser.add_argument("--resume", action="store_true", help="continue the named run, or the latest of this config")
    parser.add_argument(
        "--plain-baseline", action="store_true",
        help="then train the same student without the teacher (loss.ClassicLoss) as <run name>-plain, to compare",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override one config value (repeatable)"
    )
    return parser.parse_args(argv)


def setup_console_logging() -> logging.handlers.MemoryHandler:
    """Log to the console now; records are also kept until the run directory exists, then written to train.log."""
    close_log_handlers()
    root = logging.getLogger()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(formatter)
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun / accelerate launch: the other processes only warn
        console.setLevel(logging.WARNING)
    early_records = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    early_records.setFormatter(formatter)
    for handler in (console, early_records):
        handler._distill = True
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    _quiet_libraries()
    return early_records


def close_log_handlers() -> None:
    """Detach this run's handlers, so that a later run in the same process (tests, notebooks) logs only its own."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_distill", False):
            if isinstance(handler, logging.handlers.MemoryHandler):
                handler.setTarget(None)  # records kept before a run directory existed are not written anywhere
            root.removeHandler(handler)
            handler.close()


def _quiet_libraries() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_warning()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def start_processes(config: Config):
    """Join the other processes of a distributed launch (torchrun, accelerate launch), or run alone.

    Without a GPU the processes train on CPUs and talk through gloo."""
    from accelerate import PartialState

    return PartialState(cpu=runs_on_cpu(config.hardware))


def end_processes(status: int) -> None:
    """End a process of a distributed launch once every process is done. The process exits here, skipping the
    interpreter's teardown: there, destroying DDP's reducer can wait forever on gloo's threads. (Records, logs and
    trackers are closed by then.)"""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def runs_on_cpu(hardware) -> bool:
    return hardware.device == "cpu" or (
        hardware.device == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()
    )


def decided_by_main_process(processes, decide):
    """`decide()` on the main process only, its result (or its user error) shared with every process: the run
    directory must be one, even when the processes' clocks give different timestamps."""
    if processes.num_processes == 1:
        return decide()
    from accelerate.utils import broadcast_object_list

    outcome = [None]
    if processes.is_main_process:
        try:
            outcome = [decide()]
        except USER_ERRORS as error:
            outcome = [error]
    broadcast_object_list(outcome)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


def build_accelerator(config: Config, run: RunLocation):
    """Device and precision (and, through Accelerate, distribution, and the trackers that receive the metrics),
    decided here once for the whole program. Nothing is written until the run directory is started."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

    hardware = config.hardware
    if hardware.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("hardware.device is 'cuda' but no CUDA GPU is available; set hardware.device to auto or cpu.")
    if hardware.device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("hardware.device is 'mps' but this machine has no MPS device; set hardware.device to auto or cpu.")
    uses_cuda = hardware.device == "cuda" or (hardware.device == "auto" and torch.cuda.is_available())
    if hardware.mixed_precision == "fp16" and not uses_cuda:
        raise ConfigError("hardware.mixed_precision fp16 needs a CUDA GPU; use bf16 or no on this machine.")
    sharding = fsdp_plugin(config)
    accelerator = Accelerator(
        cpu=runs_on_cpu(hardware),
        mixed_precision=hardware.mixed_precision,
        fsdp_plugin=sharding,
        log_with=trackers(config, run) or None,
        project_config=ProjectConfiguration(project_dir=str(run.directory), logging_dir=str(run.directory)),
    )
    if sharding is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # Accelerate turns FSDP on for accelerator devices only; PyTorch's FSDP2 shards over gloo on CPUs as well.
        if hardware.mixed_precision != "no":  # as Accelerate does for GPUs
            sharding.set_mixed_precision(hardware.mixed_precision)
        accelerator.state.fsdp_plugin = sharding
        # Both shared states, as Accelerate sets them: a later AcceleratorState() copies the process state's type.
        accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    set_seed(config.seed)
    return accelerator


def fsdp_plugin(config: Config):
    """FSDP2 settings when `hardware.distributed` is fsdp (or `accelerate launch --use_fsdp` asked for it) and
    there are several processes; else None (DDP, or a single process)."""
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin, parse_flag_from_env

    hardware = config.hardware
    asked = hardware.distributed == "fsdp" or parse_flag_from_env("ACCELERATE_USE_FSDP")
    if not asked or PartialState().num_processes == 1:
        return None
    if getattr(config.training_parameters.loss, "uses_hidden_states", False):
        raise ConfigError(
            "the chunked loss reads the output head's weight outside the forward pass, where FSDP keeps only a "
            "shard of it; use loss.DistillationLoss with hardware.distributed fsdp, or set it to ddp."
        )
    if hardware.fsdp_cpu_offload and runs_on_cpu(hardware):
        raise ConfigError(
            "hardware.fsdp_cpu_offload moves sharded weights out of GPU memory, and these processes run on CPUs; "
            "set it to false."
        )
    if hardware.compile:
        raise ConfigError(
            "hardware.compile is not supported with hardware.distributed fsdp yet; set compile to false, or "
            "distributed to ddp."
        )
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",  # one unit per block: the model's _no_split_modules
        reshard_after_forward=hardware.fsdp_reshard_after_forward,
        cpu_offload=hardware.fsdp_cpu_offload,
        state_dict_type="FULL_STATE_DICT",
    )


def trackers(config: Config, run: RunLocation) -> list:
    """The experiment trackers that `training_parameters.report_to` names, through Accelerate: TensorBoard event
    files in `<run>/tensorboard/` (by default whenever tensorboard is installed), and Weights & Biases."""
    import importlib.util

    names = report_to_names(config.training_parameters)
    if names == ["auto"]:
        names = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    chosen = []
    for name in names:
        if name == "none":
            continue
        if importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"training_parameters.report_to names {name}, which is not installed; pip install {name}, or "
                f"remove it from report_to."
            )
        if name == "wandb":
            from accelerate.tracking import WandBTracker

            # The W&B project is the config's name; the run keeps the run directory's name (and resumes into it).
            chosen.append(WandBTracker(config.name, name=run.name, id=run.name, resume="allow", dir=str(run.directory)))
        else:
            chosen.append(name)
    return chosen


def start_trackers(accelerator, config: Config, state: TrainerState) -> None:
    """Open the trackers once the run directory exists. A resumed run replays the steps after its checkpoint, so
    TensorBoard drops what the interrupted process had logged past it."""
    if not accelerator.log_with:
        return
    accelerator.init_trackers("tensorboard", init_kwargs={"tensorboard": {"purge_step": state.global_step + 1}})
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.store_init_configuration(_flat(to_plain_dict(config)))


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
    return flat


def report_where(run: RunLocation, accelerator) -> None:
    """End of a run: draw its loss curves beside its records and say where everything is."""
    accelerator.end_training()
    if not accelerator.is_main_process:
        return
    import plots

    try:
        curves = plots.write_run_curves(run.directory)
    except ImportError:
        curves = None  # matplotlib is not installed: the records are all there, only the picture is missing
    logger.info("Run directory: %s (best checkpoint: %s/best)", run.directory, run.directory)
    if curves is not None:
        logger.info("Loss curves: %s (more runs side by side: python3 -m plots RUN_DIR...)", curves)


def build_models(config: Config):
    """Tokenizer, teacher (frozen; None for plain training) and student, checked against each other."""
    criterion = config.training_parameters.loss
    pretrained_student = config.student.pretrained
    tokenizer_source = pretrained_student if (pretrained_student and not criterion.requires_teacher) else config.teacher.name
    tokenizer = models.load_tokenizer(tokenizer_source)
    # With a cached teacher, the teacher's weights are only loaded if the cache must be built (after the data).
    loads_teacher = criterion.requires_teacher and config.teacher.cache_top_k is None
    teacher = models.load_teacher(config.teacher.name, teacher_dtype(config)) if loads_teacher else None
    if teacher is not None:
        teacher_config = teacher.config
    elif pretrained_student is None or criterion.requires_teacher:
        teacher_config = models.load_model_config(config.teacher.name)  # its shape only, no weights
    else:
        teacher_config = None
    student = models.build_student(teacher_config, config.distilled_model.nb_layers, pretrained_student, len(tokenizer))
    if pretrained_student is None and config.student.init != "random":
        layers = models.student_init_layers(config.student.init, config.student.teacher_layers,
                                            teacher_config.num_hidden_layers, student.config.num_hidden_layers)
        # Copied from float32 weights (a 16-bit teacher, or none at all for plain training and a cached teacher,
        # is loaded again here for the copy only).
        has_float32 = teacher is not None and teacher.dtype == torch.float32
        source = teacher if has_float32 else models.load_teacher(config.teacher.name, torch.float32)
        models.initialise_from_teacher(student, source, layers)
    student_tokenizer = models.load_tokenizer(pretrained_student) if pretrained_student and teacher else None
    models.check_compatible(tokenizer, student.config, teacher_config if criterion.requires_teacher else None,
                            student_tokenizer)
    if criterion.uses_last_hidden_state and teacher_config.hidden_size != student.config.hidden_size:
        raise ModelError(
            f"the loss's hidden_weight aligns the last hidden states, but the teacher's are {teacher_config.hidden_size} "
            f"wide and the student's {student.config.hidden_size}; set hidden_weight to 0 or use models of one width."
        )
    for role, model in (("student", student), ("teacher", teacher)):
        positions = models.max_positions(model.config) if model is not None else None
        if positions is not None and config.data.max_length > positions:
            raise ModelError(
                f"data.max_length is {config.data.max_length} but the {role} has {positions} positions; "
                f"set data.max_length to at most {positions}."
            )
    return tokenizer, teacher, student


def prepare_teacher_cache(config: Config, accelerator, tokenizer, student, splits):
    """With `teacher.cache_top_k` and a loss that has a teacher: every split's cached teacher distributions, built
    here (loading the teacher for that pass only) unless an earlier run left them. Else None."""
    top_k = config.teacher.cache_top_k
    if top_k is None or not config.training_parameters.loss.requires_teacher:
        return None
    vocab_size = student.config.vocab_size
    directory = teacher_cache.cache_directory(
        Path(config.paths.data_folder) / "teacher_cache", config.teacher.name, teacher_dtype(config), splits, top_k,
        vocab_size,
    )
    with accelerator.main_process_first():  # the main process builds it, the others then read it
        cached = teacher_cache.load(directory, dataset.SPLIT_NAMES)
        if cached is not None:
            logger.info("Using the teacher's top-%d distributions cached in %s", top_k, directory)
            return cached
        teacher = models.load_teacher(config.teacher.name, teacher_dtype(config)).to(accelerator.device)
        return teacher_cache.build(
            directory, teacher, {name: splits[name] for name in dataset.SPLIT_NAMES}, top_k, vocab_size,
            tokenizer.pad_token_id, config.training_parameters.batch_size, accelerator.device, accelerator.autocast,
        )


def teacher_dtype(config: Config) -> torch.dtype:
    """The teacher only runs forward passes, so a 16-bit copy halves its memory and time where the device has it."""
    if config.teacher.dtype != "auto":
        return getattr(torch, config.teacher.dtype)
    on_gpu = config.hardware.device in ("auto", "cuda") and torch.cuda.is_available()
    return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32


def start_run_directory(run: RunLocation, config: Config, early_records, accelerator) -> None:
    """Create the run directory (all checks passed), save the resolved config and send the log to train.log."""
    if accelerator.is_main_process:
        run.directory.mkdir(parents=True, exist_ok=run.resume)
        config_file = run.directory / ("config.resumed.yaml" if run.resume else "config.yaml")
        dump_config(config, config_file)
        log_file = logging.FileHandler(run.directory / "train.log", encoding="utf-8")
        log_file.setFormatter(early_records.formatter)
        log_file._distill = True
        logging.getLogger().addHandler(log_file)
        early_records.setTarget(log_file)
        early_records.flush()
    logging.getLogger().removeHandler(early_records)
    early_records.close()
    logger.info("%s run %s in %s", "Resuming" if run.resume else "Starting", run.name, run.directory)


@dataclass
class RunningSums:
    """Each optimizer step's token-mean loss terms, summed over the steps since the last log step, as tensors on
    the device: no value leaves the device until a log step (or a checkpoint, which saves them)."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    steps: int = 0

    @classmethod
    def zeros(cls, device) -> "RunningSums":
        return cls(*(torch.zeros((), device=device) for _ in range(3)))

    @classmethod
    def from_list(cls, values: list[float], device) -> "RunningSums":
        # float32 -> Python float -> float32 is exact, so the restored sums are bitwise the saved ones.
        return cls(*(torch.tensor(value, dtype=torch.float32, device=device) for value in values[:3]), int(values[3]))

    def add(self, output, share: float) -> None:
        """Add a micro-batch's terms, weighted by its share of the step's targets: each step adds its token mean."""
        self.loss += output.loss.detach() * share
        self.ce += output.ce.detach() * share
        if output.kd is not None:
            self.kd += output.kd.detach() * share


class HiddenStates(torch.nn.Module):
    """A causal LM whose call returns its last hidden states `(B, T, d)` instead of its logits.

    The chunked loss projects hidden states to the vocabulary itself. Accelerate prepares this wrapper rather than
    the model, so that under DDP the forward pass still goes through the DDP module and gradients are reduced.
    """

    def __init__(self, language_model: torch.nn.Module) -> None:
        super().__init__()
        self.language_model = language_model

    def forward(self, **inputs) -> torch.Tensor:
        return self.language_model.base_model(**inputs).last_hidden_state


class Trainer:
    """Holds what the loop needs: models, data, optimizer, schedule, state; writes checkpoints and metrics."""

    def __init__(self, config: Config, run: RunLocation, accelerator, tokenizer, teacher, student, splits,
                 cached_teacher: Optional[dict] = None) -> None:
        self.config = config
        self.run = run
        self.accelerator = accelerator
        self.tokenizer = tokenizer
        self.training = config.training_parameters
        self.criterion = self.training.loss
        if config.data.packing:
            collator = dataset.PackingCollator(tokenizer.pad_token_id, config.data.max_length, config.data.mask_instruction)
        else:
            collator = dataset.PaddingCollator(tokenizer.pad_token_id, config.data.mask_instruction)
        # The teacher's cached distributions (teacher_cache.py) when configured: then the teacher is never called.
        self.cached_teacher = cached_teacher
        collators = {name: collator for name in dataset.SPLIT_NAMES}
        if cached_teacher is not None:
            splits = {name: splits[name].add_column("sample_index", np.arange(len(splits[name])))
                      for name in dataset.SPLIT_NAMES}
            collators = {name: teacher_cache.CachedTeacherCollator(collator, cached_teacher[name])
                         for name in dataset.SPLIT_NAMES}
        self.has_teacher = teacher is not None or cached_teacher is not None
        self.train_loader, self.validation_loader, self.test_loader = (
            self._loader(splits[name], collators[name], shuffle=name == "train") for name in dataset.SPLIT_NAMES
        )
        # A sample with a target, collated once: the stand-in for a process that has no batch left in an epoch's
        # last step (weighted 0), since every process must take part in each step's gradient reduction.
        self.stand_in_batch = collators["train"]([splits["train"][0]])
        # Real and target tokens per training sample, so that every process knows each step's totals over all
        # processes without communicating (or waiting on the device).
        lengths = np.asarray(splits["train"]["length"])
        self.sample_tokens = lengths
        self.sample_targets = dataset.target_counts(
            lengths, np.asarray(splits["train"]["prompt_length"]), config.data.mask_instruction
        )
        optimizer = build_optimizer(student, self.training)
        # An optimizer step takes `gradient_accumulation_steps` batches on each process: the global batch is
        # batch_size x gradient_accumulation_steps x processes samples.
        self.batches_per_step = self.training.gradient_accumulation_steps * accelerator.num_processes
        self.steps_per_epoch = math.ceil(self.train_loader.batch_sampler.total / self.batches_per_step)
        self.total_steps = self.steps_per_epoch * self.training.nb_epochs
        if self.training.max_steps is not None:
            self.total_steps = min(self.total_steps, self.training.max_steps)
        self.scheduler = build_scheduler(optimizer, self.training, self.total_steps)
        # The causal LMs themselves (what checkpoints hold); `self.student` and `self.teacher` are what is called,
        # as Accelerate prepared them, and return hidden states rather than logits for the chunked loss.
        self.student_model, self.teacher_model = student, teacher
        student_network, teacher_network = student, teacher
        if self.criterion.uses_hidden_states:
            student_network, teacher_network = HiddenStates(student), HiddenStates(teacher)
        if config.hardware.compile:
            for network in (student_network, teacher_network):
                if network is not None:
                    network.compile(dynamic=True)  # batches vary in length: one graph with a symbolic length
        # The data loaders stay ours (dataset.EpochBatches shards them); Accelerate places each batch on the device.
        self.student, self.optimizer = accelerator.prepare(student_network, optimizer)
        self.teacher = None
        if teacher_network is not None and accelerator.is_fsdp2:
            from accelerate.utils import fsdp2_prepare_model

            self.teacher = fsdp2_prepare_model(accelerator, teacher_network)  # sharded like the student, in place
        elif teacher_network is not None:
            self.teacher = accelerator.prepare_model(teacher_network, evaluation_mode=True)
        self.state = TrainerState()
        self.sums = RunningSums.zeros(accelerator.device)
        self.last_saved_step: Optional[int] = None
        self.stop_signals = StopSignals()
        self.identity = run_identity(student.config, tokenizer, self.criterion)
        self.metrics_file = run.directory / "metrics.jsonl"
        self.started_at, self.elapsed_before = time.time(), 0.0
        self.teacher_results: dict[str, dict] = {}  # the frozen teacher's loss per split, computed once
        logger.info(
            "Student: %s parameters, %d layers; teacher: %s; loss: %r",
            f"{models.count_parameters(student):,}",
            student.config.num_hidden_layers,
            f"{models.count_parameters(teacher):,} parameters" if teacher is not None
            else f"its cached top-{config.teacher.cache_top_k} distributions" if cached_teacher is not None
            else "not loaded",
            self.criterion,
        )
        logger.info(
            "Data: %s; %d optimizer steps of %d samples (%d per process and micro-batch, %d micro-batches, %d "
            "processes, %s)",
            ", ".join(f"{name} {len(splits[name])}" for name in dataset.SPLIT_NAMES),
            self.total_steps,
            self.training.batch_size * self.batches_per_step,
            self.training.batch_size,
            self.training.gradient_accumulation_steps,
            accelerator.num_processes,
            {"fsdp": "models sharded with FSDP2", "ddp": "DDP", "none": "alone"}[distribution(accelerator)],
        )

    def _loader(self, split, collator, shuffle: bool) -> DataLoader:
        sampler = dataset.EpochBatches(
            split["length"], self.training.batch_size, self.config.seed, shuffle, self.config.data.group_by_length,
            self.accelerator.num_processes, self.accelerator.process_index,
        )
        # A generator of its own: starting to iterate then draws nothing from the global RNG, whose state (dropout)
        # a checkpoint restores, so a resumed run continues exactly as an uninterrupted one.
        generator = torch.Generator().manual_seed(self.config.seed)
        return DataLoader(split, batch_sampler=sampler, collate_fn=collator, generator=generator)

    def _on_device(self, batch: dict) -> dict:
        from accelerate.utils import send_to_device

        return send_to_device(batch, self.accelerator.device)

    # --- state ---------------------------------------------------------------------------------------------------

    @property
    def last_directory(self) -> Path:
        return self.run.directory / self.training.checkpoints_name_last

    @property
    def best_directory(self) -> Path:
        return self.run.directory / self.training.checkpoints_name_best

    def restore(self) -> None:
        """On a resume, load the last checkpoint (reading only: nothing is written before the run directory)."""
        if not self.run.resume:
            return
        self.state = load_trainer_state(self.last_directory, self.identity)
        self.last_saved_step = self.state.global_step
        self.elapsed_before = self.state.elapsed_s
        if self.state.interval_sums is not None:
            if self.accelerator.is_main_process:
                self.sums = RunningSums.from_list(self.state.interval_sums, self.accelerator.device)
            else:  # the saved sums are over all processes: the main process holds them once
                self.sums = RunningSums.zeros(self.accelerator.device)
                self.sums.steps = int(self.state.interval_sums[3])
        load_model_weights(self.last_directory, self.student_model)
        load_training_state(
            self.last_directory, self.student_model, self.optimizer, self.scheduler, self.accelerator.scaler
        )
        logger.info(
            "Resumed from %s: epoch %d, step %d, %d batches into the epoch",
            self.last_directory, self.state.epoch + 1, self.state.global_step, self.state.batches_done_in_epoch,
        )

    # --- training ------------------------------------------------------------------------------------------------

    def fit(self) -> None:
        state = self.state
        if self.run.resume:
            self._drop_metrics_after(state.global_step)
        if state.global_step < self.total_steps:  # a resumed run may already be complete
            with self.stop_signals:
                for epoch in range(state.epoch, self.training.nb_epochs):
                    if self._train_one_epoch(epoch):
                        break
        if state.last_evaluated_step != state.global_step:
            self.validate()
        if self.last_saved_step != state.global_step:
            self.save_last()
        logger.info(
            "Training done: %d steps; best validation loss %.4f at step %s",
            state.global_step, state.best_validation_loss, state.best_step,
        )

    def _train_one_epoch(self, epoch: int) -> bool:
        """One pass over the training split (from the saved position when resuming); True when max_steps is hit."""
        accelerator, state, training = self.accelerator, self.state, self.training
        sampler = self.train_loader.batch_sampler
        sampler.set_epoch(epoch, start=state.batches_done_in_epoch)  # global batches already done (a resume)
        remaining_batches = sampler.global_batches()[state.batches_done_in_epoch :]
        my_batches = iter(self.train_loader)
        interval_start, interval_tokens = time.perf_counter(), 0
        progress = _progress_bar(accelerator, sampler.total, state.batches_done_in_epoch, epoch, training)
        self.student.train()
        for step_start in range(0, len(remaining_batches), self.batches_per_step):
            step_indices = np.concatenate(remaining_batches[step_start : step_start + self.batches_per_step])
            # Global batch k of the step is on process k % processes: this process's share of the step.
            in_step = min(self.batches_per_step, len(remaining_batches) - step_start)
            mine = max(0, -(-(in_step - accelerator.process_index) // accelerator.num_processes))
            step_targets = int(self.sample_targets[step_indices].sum())
            self._optimizer_step([self._on_device(next(my_batches)) for _ in range(mine)], step_targets)
            real_tokens = int(self.sample_tokens[step_indices].sum())
            interval_tokens += real_tokens
            state.tokens_seen += real_tokens
            state.samples_seen += len(step_indices)
            state.batches_done_in_epoch += in_step
            progress.update(in_step)
            state.global_step += 1
            if state.global_step % training.log_every_steps == 0:
                record = self._log_training(epoch, interval_tokens / (time.perf_counter() - interval_start))
                progress.set_postfix({key: f"{record[key]:.3f}" for key in ("loss", "kd", "ce") if record[key] is not None})
                self.sums = RunningSums.zeros(accelerator.device)
                interval_start, interval_tokens = time.perf_counter(), 0
            paused = time.perf_counter()  # evaluation and checkpoints do not count against tokens per second
            if training.eval_every_steps and state.global_step % training.eval_every_steps == 0:
                self.validate()
                self.student.train()
            if training.checkpoint_every_steps and state.global_step % training.checkpoint_every_steps == 0:
                self.save_last()
                if training.keep_step_checkpoints and self.accelerator.is_main_process:
                    keep_step_snapshot(self.last_directory, state.global_step, training.keep_step_checkpoints)
            interval_start += time.perf_counter() - paused
            if self.stop_signals.received is not None:
                progress.close()
                self._stop_for_signal()
            if training.max_steps is not None and state.global_step >= training.max_steps:
                progress.close()
                return True
        progress.close()
        state.epoch = epoch + 1
        state.batches_done_in_epoch = 0
        if state.last_evaluated_step != state.global_step:  # not already validated at this step by eval_every_steps
            self.validate()
        self.save_last()  # always: the checkpoint must record that the epoch is complete
        return False

    def _optimizer_step(self, step_batches: list[dict], step_targets: int) -> None:
        """One optimizer step over this process's micro-batches, normalised by `step_targets`, the real target
        tokens of the whole step on every process.

        Each micro-batch's loss is a mean over its own targets; weighting it by its share of the step's targets
        makes the gradient the mean over every target of the step, so the update does not depend on how the
        step's samples are split into micro-batches and processes. (DDP averages the processes' gradients, hence
        the factor `num_processes`.)
        """
        accelerator, training, state = self.accelerator, self.training, self.state
        step_targets = max(step_targets, 1)
        # A process with no batch left in an epoch's last step still joins the gradient reduction, with weight 0.
        planned = [(batch, batch["target_tokens"]) for batch in step_batches] or [(self._stand_in(), 0)]
        for index, (batch, targets) in enumerate(planned):
            last = index == len(planned) - 1
            # Gradients are only reduced across processes on the last micro-batch of the step.
            with contextlib.nullcontext() if last else accelerator.no_sync(self.student):
                output = self.compute_loss(batch)
                # Checking every loss costs a device sync, so only the `skip` policy does it.
                if training.on_nonfinite_loss == "skip" and not torch.isfinite(output.loss).item():
                    state.skipped_batches += 1
                    logger.warning("Skipped a batch with a non-finite loss at step %d", state.global_step + 1)
                    if not last or accelerator.num_processes == 1:
                        continue
                    # This process must still join the step's gradient reduction: with a stand-in of weight 0.
                    output, targets = self.compute_loss(self._stand_in()), 0
                    if not torch.isfinite(output.loss).item():
                        raise self._non_finite_loss()  # even a plain training sample fails: the weights are broken
                share = targets / step_targets
                accelerator.backward(output.loss * share * accelerator.num_processes)
                self.sums.add(output, share)
        self.sums.steps += 1
        if training.max_grad_norm is not None:
            accelerator.clip_grad_norm_(self.student.parameters(), training.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _stand_in(self) -> dict:
        return self._on_device(self.stand_in_batch)

    def _stop_for_signal(self) -> None:
        if self.last_saved_step != self.state.global_step:
            self.save_last()
        raise StoppedBySignal(self.stop_signals.received, self.state.global_step, self.last_directory)

    def _check_finite(self) -> None:
        """Never validate or save weights that a NaN or inf loss has reached (one device sync, at those moments)."""
        if self.training.on_nonfinite_loss == "stop" and not torch.isfinite(self._global_sums()[0]).item():
            raise self._non_finite_loss()

    def _global_sums(self) -> torch.Tensor:
        """Loss, kd and ce summed since the last log step over every process (each holds its own shares)."""
        sums = torch.stack([self.sums.loss, self.sums.kd, self.sums.ce])
        return self.accelerator.reduce(sums, reduction="sum") if self.accelerator.num_processes > 1 else sums

    def _non_finite_loss(self) -> "NonFiniteLoss":
        return NonFiniteLoss(self.state.global_step, self.last_directory, self.last_saved_step)

    def compute_loss(self, batch: dict):
        """The criterion on a training batch: its LossOutput."""
        return self._forward(batch, with_logits=False)

    def _forward(self, batch: dict, with_logits: bool):
        """The criterion on a batch: its LossOutput; with `with_logits` (evaluation), also the student's and the
        teacher's logits `(B, T, V)` (the teacher's None when there is none)."""
        if self.criterion.uses_hidden_states:
            return self._compute_loss_from_hidden_states(batch, with_logits)
        inputs = model_inputs(batch)
        if self.cached_teacher is not None:
            with self.accelerator.autocast():
                student_logits = self.student(**inputs).logits
            output = self.criterion.from_cached_teacher(student_logits, batch["labels"], teacher_cache.from_batch(batch))
            return (output, student_logits, None) if with_logits else output
        wants_hidden = self.criterion.uses_last_hidden_state
        with self.accelerator.autocast():
            teacher_output = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_output = self.teacher(**inputs, output_hidden_states=wants_hidden)
            student_output = self.student(**inputs, output_hidden_states=wants_hidden)
        teacher_logits = teacher_output.logits if teacher_output is not None else None
        hidden_states = {}
        if wants_hidden:  # the last hidden state, after the final norm
            hidden_states = {"student_hidden": student_output.hidden_states[-1],
                             "teacher_hidden": teacher_output.hidden_states[-1]}
        output = self.criterion(student_output.logits, batch["labels"], teacher_logits, **hidden_states)
        return (output, student_output.logits, teacher_logits) if with_logits else output

    def _compute_loss_from_hidden_states(self, batch: dict, with_logits: bool):
        """For the chunked loss: the models' last hidden states and output heads, never their full logits (but in
        evaluation, for the agreement with the teacher)."""
        with self.accelerator.autocast():
            with torch.no_grad():
                teacher_hidden = self.teacher(**model_inputs(batch))
            student_hidden = self.student(**model_inputs(batch))
        student_head = self.student_model.get_output_embeddings().weight
        teacher_head = self.teacher_model.get_output_embeddings().weight
        output = self.criterion(student_hidden, student_head, batch["labels"], teacher_hidden, teacher_head)
        if not with_logits:
            return output
        return output, student_hidden @ student_head.T, teacher_hidden @ teacher_head.T

    # --- evaluation ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, loader) -> dict:
        """Loss terms averaged over every real target token of the split (not over batches), the student's
        perplexity and, with a teacher, how close the student is to it: KL(teacher || student) at temperature 1
        and the share of targets where both models' most likely next token is the same."""
        self.student.eval()
        # Summed over targets: loss, kd, ce, KL at T = 1, top-1 agreements; and the targets.
        totals = torch.zeros(6, device=self.accelerator.device)
        for batch, weight in self._in_step(loader):
            output, student_logits, teacher_logits = self._forward(batch, with_logits=True)
            targets = (batch["labels"][:, 1:] != IGNORE_INDEX).sum() * weight
            kd = output.kd if output.kd is not None else torch.zeros_like(output.ce)
            totals[:3] += torch.stack([output.loss, kd, output.ce]).float() * targets
            if teacher_logits is not None:
                totals[3:5] += agreement_with_teacher(student_logits, teacher_logits, batch["labels"]) * weight
            elif self.cached_teacher is not None:
                totals[3:5] += agreement_with_cached_teacher(
                    student_logits, teacher_cache.from_batch(batch), batch["labels"]) * weight
            totals[5] += targets
        totals = self.accelerator.reduce(totals, reduction="sum")
        loss, kd, ce, kl, agreements, targets = (totals / totals[5]).tolist()
        has_teacher = self.has_teacher
        return {
            "loss": loss,
            "kd": kd if has_teacher else None,
            "ce": ce,
            "perplexity": perplexity(ce),
            "kl_teacher": kl if has_teacher else None,
            "top1_agreement": agreements if has_teacher else None,
            "target_tokens": int(totals[5].item()),
        }

    def _in_step(self, loader):
        """(batch on the device, weight) for this process's evaluation batches (weight 1), then stand-in batches
        (weight 0) until every process has run as many: a sharded model's forward pass gathers its weights from
        all processes, so they must all take part in each one."""
        count = 0
        for batch in loader:
            count += 1
            yield self._on_device(batch), 1
        batches_per_process = -(-loader.batch_sampler.total // self.accelerator.num_processes)
        for _ in range(batches_per_process - count):
            yield self._on_device(self.stand_in_batch), 0

    def validate(self) -> None:
        self._check_finite()
        state = self.state
        result = self.evaluate(self.validation_loader)
        state.last_evaluated_step = state.global_step
        if self.training.best_metric == "perplexity":
            improved = state.best_validation_perplexity is None or result["perplexity"] < state.best_validation_perplexity
        else:
            improved = state.best_validation_loss is None or result["loss"] < state.best_validation_loss
        if improved:
            state.best_validation_loss, state.best_step = result["loss"], state.global_step
            state.best_validation_perplexity = result["perplexity"]
        self._write_record("validation", result)
        logger.info(
            "Validation at step %d: loss %.4f, kd %s, ce %.4f, perplexity %.2f%s",
            state.global_step, result["loss"], _format(result["kd"]), result["ce"], result["perplexity"],
            " (best so far)" if improved else "",
        )
        if improved:
            self._save(self.best_directory)

    def test_best(self) -> None:
        """Evaluate the best checkpoint on the test split (and the teacher once) and write summary.json."""
        load_model_weights(self.best_directory, self.student_model)
        result = self.evaluate(self.test_loader)
        self._write_record("test", result)
        logger.info(
            "Test (best checkpoint, step %s): loss %.4f, kd %s, ce %.4f, perplexity %.2f",
            self.state.best_step, result["loss"], _format(result["kd"]), result["ce"], result["perplexity"],
        )
        teacher = None
        if self.has_teacher:
            teacher = {name: self.teacher_result(name) for name in ("validation", "test")}
            logger.info("Teacher: validation perplexity %.2f, test perplexity %.2f",
                        teacher["validation"]["perplexity"], teacher["test"]["perplexity"])
        summary = {
            "run": self.run.name,
            "steps": self.state.global_step,
            "samples_seen": self.state.samples_seen,
            "tokens_seen": self.state.tokens_seen,
            "best_step": self.state.best_step,
            "best_validation_loss": self.state.best_validation_loss,
            "best_validation_perplexity": self.state.best_validation_perplexity,
            "best_metric": self.training.best_metric,
            "test": result,
            "teacher": teacher,
            "skipped_batches": self.state.skipped_batches,
            "processes": self.accelerator.num_processes,
            "distributed": distribution(self.accelerator),
            "wall_time_s": round(self.elapsed(), 2),
        }
        if self.accelerator.is_main_process:
            (self.run.directory / "summary.json").write_text(json.dumps(summary, indent=2))

    @torch.no_grad()
    def teacher_result(self, split: str) -> dict:
        """The teacher's next-token CE and perplexity on a split: the reference a student's perplexity is read
        against. The teacher is frozen, so each split is evaluated once per run."""
        if split not in self.teacher_results:
            loader = {"validation": self.validation_loader, "test": self.test_loader}[split]
            totals = torch.zeros(2, device=self.accelerator.device)  # CE summed over targets; targets
            for batch, weight in self._in_step(loader):
                is_target = batch["labels"][:, 1:] != IGNORE_INDEX
                targets = is_target.sum() * weight
                if self.cached_teacher is not None:
                    ce_sum = -batch["teacher_target_log_prob"][:, :-1][is_target].sum() * weight
                    totals += torch.stack([ce_sum, targets.float()])
                    continue
                with self.accelerator.autocast():
                    logits = self.teacher_model(**model_inputs(batch)).logits
                ce = next_token_cross_entropy(logits[..., : self.student_model.config.vocab_size], batch["labels"])
                totals += torch.stack([ce.float() * targets, targets.float()])
            ce_sum, count = self.accelerator.reduce(totals, reduction="sum").tolist()
            ce = ce_sum / max(count, 1)
            self.teacher_results[split] = {"ce": ce, "perplexity": perplexity(ce)}
        return self.teacher_results[split]

    def elapsed(self) -> float:
        """Seconds of the run so far, including those of the processes it was resumed from."""
        return self.elapsed_before + time.time() - self.started_at

    # --- records and checkpoints ---------------------------------------------------------------------------------

    def save_last(self) -> None:
        self._save(self.last_directory)
        self.last_saved_step = self.state.global_step

    def _save(self, directory: Path) -> None:
        self._check_finite()
        # The loss sums since the last log step travel with the checkpoint, so a resumed run logs the same numbers.
        self.state.interval_sums = [*self._global_sums().tolist(), self.sums.steps]
        self.state.elapsed_s = round(self.elapsed(), 3)
        weights, optimizer_state = gather_training_states(self.student_model, self.optimizer)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_checkpoint(
                directory, self.student_model, self.tokenizer, optimizer_state, self.scheduler, self.state,
                self.identity, self.accelerator.scaler, weights,
            )
        self.accelerator.wait_for_everyone()  # no process reads a checkpoint (the best, for the test) mid-write

    def _log_training(self, epoch: int, tokens_per_second: float) -> dict:
        sums = self.sums
        count = max(sums.steps, 1)
        # The one device sync of the interval: every term leaves the device together.
        loss, kd, ce = (self._global_sums() / count).tolist()
        if self.training.on_nonfinite_loss == "stop" and not math.isfinite(loss):
            raise self._non_finite_loss()
        record = {
            "loss": loss,
            "kd": kd if self.has_teacher else None,
            "ce": ce,
            "perplexity": perplexity(ce),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "tokens_per_s": round(tokens_per_second, 1),
            "peak_memory_mib": peak_memory_mib(self.accelerator.device),
        }
        self._write_record("train", record, epoch=epoch)
        return record

    def _write_record(self, split: str, values: dict, epoch: Optional[int] = None) -> None:
        state = self.state
        record = {
            "split": split,
            "step": state.global_step,
            "epoch": state.epoch if epoch is None else epoch,
            "samples_seen": state.samples_seen,
            "tokens_seen": state.tokens_seen,
            **values,
            "wall_time_s": round(self.elapsed(), 3),
        }
        if self.accelerator.is_main_process:
            with self.metrics_file.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        numbers = {f"{split}/{key}": value for key, value in values.items() if isinstance(value, (int, float))}
        self.accelerator.log(numbers, step=state.global_step)  # a no-op without trackers

    def _drop_metrics_after(self, step: int) -> None:
        """A resumed run replays the steps after its last checkpoint: forget their records, so none is doubled."""
        if not (self.accelerator.is_main_process and self.metrics_file.is_file()):
            return
        records = [json.loads(line) for line in self.metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = [record for record in records if record["step"] <= step and record["split"] != "test"]
        self.metrics_file.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")


def distribution(accelerator) -> str:
    """How the processes held the models: none (one process), ddp (whole copies) or fsdp (sharded)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "none"


def peak_memory_mib(device: torch.device) -> float:
    """The peak memory so far: allocated tensors on a GPU; on a CPU, the process's peak resident size."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def perplexity(cross_entropy: float) -> float:
    # Capped so that an untrained model's loss gives a large number rather than an overflow.
    return math.exp(min(cross_entropy, 50.0))


def model_inputs(batch: dict) -> dict:
    """What a model call takes from a batch: packed batches add position ids (and a 4-D attention mask)."""
    names = ("input_ids", "attention_mask", "position_ids")
    # No key/value cache: it is only for generation, and building it costs a copy per layer.
    return {"use_cache": False, **{name: batch[name] for name in names if name in batch}}


def build_optimizer(student: torch.nn.Module, training) -> torch.optim.Optimizer:
    # Weight decay on matrices only: decaying biases and LayerNorm gains hurts and is not what AdamW papers do.
    decayed = [p for p in student.parameters() if p.requires_grad and p.dim() >= 2]
    others = [p for p in student.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decayed, "weight_decay": training.weight_decay},
        {"params": others, "weight_decay": 0.0},
    ]
    if training.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=training.learning_rate, momentum=training.momentum)
    return torch.optim.AdamW(groups, lr=training.learning_rate)


def build_scheduler(optimizer: torch.optim.Optimizer, training, total_steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[training.lr_scheduler]
    return get_scheduler(
        name, optimizer, num_warmup_steps=min(training.warmup_steps, total_steps), num_training_steps=total_steps
    )


def _progress_bar(accelerator, total: int, done: int, epoch: int, training):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=done,
        desc=f"epoch {epoch + 1}/{training.nb_epochs}",
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
        leave=False,
    )


def _format(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
