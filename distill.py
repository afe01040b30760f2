"""Distil a causal-LM teacher into a smaller student, or train the student alone, as config.yaml says.

    python3 distill.py                                   # ./config.yaml, a new run
    python3 distill.py --config configs/tiny.yaml --plain-baseline   # the offline demo: distilled and plain
    python3 distill.py --resume --run-name NAME          # continue a stopped run
    python3 distill.py --set training_parameters.batch_size=8 --set training_parameters.loss.temperature=2
    python3 distill.py --push checkpoints/RUN --model-id user/name   # push a run's best checkpoint to the Hub

Every run writes `<paths.checkpoints>/<run name>/`: config.yaml (resolved), train.log, metrics.jsonl, summary.json,
loss_curves.png, TensorBoard events, and the last and best checkpoints (best/ with its model card, README.md; pushed
to the Hub when hub.model_id is set). A configuration or data mistake stops the program with one sentence and exit
code 2 before anything is written; SIGINT (Ctrl-C) or SIGTERM, at any moment, with one sentence that names what it
stopped and the command that goes on from there, and exit code 130 or 143.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import dataset
import models
from distillation.base import hub_client, storage
from distillation.base.errors import EXIT_NON_FINITE_LOSS, EXIT_SIGNAL_BASE, EXIT_USER_ERROR, UserError, first_line
from distillation.run import baseline_comparison, checkpoints, model_card, records, runs
from distillation.run.checkpoints import CheckpointError
from distillation.run.hub_push import PushStopped, push_checkpoint
from distillation.run.runs import PLAIN_BASELINE_SUFFIX, locate_run
from distillation.runtime import hardware
from distillation.settings.config import load_config
from distillation.settings.schema import Config, ConfigError, check_model_id
from distillation.training import responses, stop_signals, teacher_cache
from distillation.training.steps import NonFiniteLoss
from distillation.training.stop_signals import StoppedBySignal, during
from distillation.training.trainer import Trainer

logger = logging.getLogger("distill")


_KEPT_UNTIL_EXIT: list = []
PLAIN_LOSS_OVERRIDE = "training_parameters.loss={'()': loss.ClassicLoss}"
# Plain training on the data's responses: no teacher, so nothing generated either.
PLAIN_RESPONSES_OVERRIDES = ["responses.lmbda=0", "responses.seq_kd=false"]
# The baseline is a comparison, not the student the user shares: `--push RUN-plain --model-id ID` pushes it.
BASELINE_NOT_PUSHED = "hub.model_id=null"
# Whether the baseline resumes is decided from its run (below), not from `resume: true` in the file: a run resumed
# by the file would otherwise find no baseline to resume, the first time, and stop.
BASELINE_RESUME_DECIDED = "training_parameters.resume=false"


def main(argv: list[str] | None = None) -> int:
    # From here to the end, SIGINT and SIGTERM stop with one sentence (ending); the processes' final barrier is
    # outside, where a signal ends a process as it would without this program's handlers.
    with stop_signals.interrupting():
        status = run_command(argv)
    hardware.end_processes(status)
    return status


def run_command(argv: list[str] | None) -> int:
    command = None
    try:
        command = Command(parse_arguments(argv))
        hub_client.bound_waits()  # a Hub that never answers ends a run's loading, or a push, after a bounded wait
        if command.arguments.push is not None:
            return push_run(Path(command.arguments.push), command.arguments.model_id, command)
        return train_runs(command)
    except KeyboardInterrupt as stop:  # between two runs, or while the cleanup after an error or a stop ran
        stop_signals.ignore_further()
        records.setup_console_logging()
        try:
            return ending(stop, command.run if command else None, command)
        finally:
            records.close_log_handlers()


def train_runs(command: Command) -> int:
    """The run the arguments name, then its plain baseline if asked for."""
    arguments = command.arguments
    status, run, pushed = train(arguments.config, arguments.set, arguments.run_name, arguments.resume, command)
    if status == 0 and arguments.plain_baseline:
        # A failed push of the run (said, with the command that retries it) does not keep its baseline from training.
        command.main_run = run.name
        # The same config, seed, data and steps, with plain next-token training: the comparison distillation needs.
        baseline = run.directory.with_name(run.name + PLAIN_BASELINE_SUFFIX)
        # Continued with the run (--resume or resume: true) if it had started training.
        resume = run.resume and baseline.exists() and not runs.is_untrained(baseline)
        status, _, _ = train(
            arguments.config,
            [
                *arguments.set,
                PLAIN_LOSS_OVERRIDE,
                *PLAIN_RESPONSES_OVERRIDES,
                BASELINE_NOT_PUSHED,
                BASELINE_RESUME_DECIDED,
            ],
            baseline.name,
            resume,
            command,
        )
        if status == 0:  # both complete: their test figures side by side, and their comparison figure
            show_comparison(run.directory, baseline)
    return status or pushed


def show_comparison(run_directory: Path, baseline_directory: Path) -> None:
    """The run and its plain baseline side by side, said on the console (both runs' own logs are closed)."""
    records.setup_console_logging()
    try:
        baseline_comparison.report(run_directory, baseline_directory)
    finally:
        records.close_log_handlers()


@dataclass
class Command:
    """The command line, and where it stands: what a stop names as the command to run next (`line`)."""

    arguments: argparse.Namespace
    run: runs.RunLocation | None = None  # the run being trained, once set up
    main_run: str | None = None  # the first run's name, once it is complete and its plain baseline starts

    def line(self, resume: bool, run_name: str | None) -> str:
        """The command, continuing the run `run_name` (resume) or naming it; the same config and overrides."""
        arguments, words = self.arguments, ["python3", "distill.py"]
        if arguments.push is not None:
            words += ["--push", arguments.push]
            return shlex.join(words + (["--model-id", arguments.model_id] if arguments.model_id else []))
        if arguments.config != DEFAULT_CONFIG:
            words += ["--config", arguments.config]
        for override in arguments.set:
            words += ["--set", override]
        words += (["--plain-baseline"] if arguments.plain_baseline else []) + (["--resume"] if resume else [])
        return shlex.join(words + (["--run-name", run_name] if run_name is not None else []))

    def again(self) -> str:
        return self.line(self.arguments.resume, self.arguments.run_name)


def train(config_file: str, overrides: list[str], run_name: str | None, resume: bool, command: Command):
    """One run, from the config to the tested best checkpoint and its model card, then its push to the Hub when
    hub.model_id names a repository: (the run's exit status, its RunLocation or None, the push's exit status). The
    push comes once the run is released: however long the Hub takes, it never holds the run."""
    early_records = records.setup_console_logging()
    run = command.run = card = None
    try:
        with during("reading the config"):
            config = load_config(config_file, overrides)
        with during("setting up the run"):
            # The first run of a --plain-baseline command: the data must have the responses its baseline trains on.
            trainer = setup(config, run_name, resume, command.arguments.plain_baseline and command.main_run is None)
        run = command.run = trainer.run
        accelerator = trainer.accelerator
        with trainer.stop_signals:  # from the first file written in the run directory to the last
            with during("starting the run"):
                records.start_run_directory(run, config, early_records, accelerator)
                records.start_trackers(accelerator, config, trainer.state)
            with during("training"):
                trainer.fit()
            with during("testing the best checkpoint"):
                trainer.test_best()
            records.report_where(run, accelerator, config.training_parameters.checkpoints_name_best)
            if accelerator.is_main_process:
                with during("writing the model card"):
                    card = model_card.write_model_card(run.directory, config)
                logger.info("Model card: %s", card)
    except (Exception, KeyboardInterrupt) as error:
        status = ending(error, run, command)
        if status is None:
            raise
        return status, run, 0
    finally:
        with stop_signals.held_back():  # a signal now is delivered once the run is released (run_command)
            records.close_log_handlers()
            runs.release_runs()
    if card is None or config.hub.model_id is None:
        return 0, run, 0
    records.setup_console_logging()  # the push is said on the console; the run's own log is closed
    try:
        return 0, run, push(card.parent, config.hub.model_id, run.directory)
    finally:
        records.close_log_handlers()


def push(best: Path, model_id: str, run_directory: Path) -> int:
    """Push a run's best checkpoint: its exit status. A push that fails or is stopped (SIGINT and SIGTERM are
    interrupts from the start of `main`) leaves the run as it is, and its one sentence names the retry command."""
    try:
        push_checkpoint(best, model_id, push_command(run_directory, model_id))
    except (Exception, KeyboardInterrupt) as error:
        status = ending(error, None)
        if status is None:
            raise
        return status
    return 0


def push_command(run_directory: Path, model_id: str) -> str:
    return shlex.join(["python3", "distill.py", "--push", str(run_directory), "--model-id", model_id])


def push_run(run_directory: Path, model_id: str | None, command: Command | None = None) -> int:
    """`--push RUN_DIR`: push a finished run's best checkpoint (with its model card, written if it has none) to
    `model_id`, or to the run's own hub.model_id."""
    records.setup_console_logging()
    try:
        config, model_id = read_push_target(run_directory, model_id)
        runs.hold_run(run_directory, created=False)  # not while a process trains it
        best = run_directory / config.training_parameters.checkpoints_name_best
        if not (run_directory / model_card.SUMMARY_FILE).is_file() or not best.is_dir():
            raise CheckpointError(
                f"the run {run_directory} has not finished (no summary.json or best checkpoint); "
                f"finish it with --resume --run-name {shlex.quote(run_directory.name)}, then push it."
            )
        if not (best / model_card.CARD_FILE).is_file():  # a card the user edited is pushed as it is
            model_card.write_model_card(run_directory, config)
        push_checkpoint(best, model_id, push_command(run_directory, model_id))
    except (Exception, KeyboardInterrupt) as error:
        status = ending(error, None, command)
        if status is None and isinstance(error, (OSError, ValueError)):
            # A damaged summary.json or checkpoint, a card the disk refused: the run cannot be pushed as it is.
            status = ending(
                UserError(
                    f"the run {run_directory} cannot be pushed ({first_line(error)}); check its "
                    f"best checkpoint and summary.json, or free disk space, then run the same "
                    f"command again."
                ),
                None,
            )
        if status is None:
            raise
        return status
    finally:
        with stop_signals.held_back():
            records.close_log_handlers()
            runs.release_runs()
    return 0


def read_push_target(run_directory: Path, model_id: str | None) -> tuple[Config, str]:
    """The run's config and the Hub repository to push it to, checked."""
    if not (run_directory / "config.yaml").is_file():
        raise CheckpointError(
            f"{run_directory} is not a run directory (it has no config.yaml); pass one, e.g. checkpoints/<run name>."
        )
    config = load_config(run_directory / "config.yaml")
    model_id = model_id or config.hub.model_id
    if model_id is None:
        raise ConfigError(
            f"the run {run_directory} names no Hub repository (its hub.model_id is null); pass one "
            f"with --model-id user/name."
        )
    check_model_id(model_id, "--model-id")
    return config, model_id


def ending(error: BaseException, run, command: Command | None = None) -> int | None:
    """The one place where an error becomes an exit code: the error is logged in one sentence and its exit code
    returned; None for an error that is a bug (raised with its traceback). `run` is the run set up, if any, and
    `command` the command line that a stop names the next command from."""
    if isinstance(error, UserError):
        logger.error("error: %s", error)
        return EXIT_USER_ERROR
    if isinstance(error, (StoppedBySignal, PushStopped)):
        stop_signals.ignore_further()
        logger.error("%s", error)
        return EXIT_SIGNAL_BASE + error.signal_number
    if isinstance(error, NonFiniteLoss):
        logger.error("error: %s", error)
        return EXIT_NON_FINITE_LOSS
    if isinstance(error, KeyboardInterrupt):  # a signal outside the training loop, or a second one
        stop_signals.ignore_further()
        number = getattr(error, "signal_number", signal.SIGINT)
        what = getattr(error, "during", None)
        stopped = f"stopped by {signal.Signals(number).name}" + (f" while {what}" if what else "")
        logger.error("%s; %s", stopped, after_a_stop(run, command))
        return EXIT_SIGNAL_BASE + number
    message = file_system_message(error, run) if isinstance(error, Exception) else None
    if message is None:
        return None
    logger.error("error: %s", message)
    return EXIT_USER_ERROR


def after_a_stop(run, command: Command | None) -> str:
    """What a stop at once leaves, and the command that goes on from there."""
    if command is not None and command.main_run is not None:  # the plain baseline's turn: the run is complete
        return f"the run {command.main_run} is complete, continue with {command.line(True, command.main_run)}"
    if run is None:  # nothing was written in a run directory (one created for it is removed again)
        again = f": {command.again()}" if command is not None else ""
        return f"nothing was written in the run yet, run the same command again{again}"
    if runs.is_untrained(run.directory):  # a new run of its name takes the directory over (runs.py)
        again = f": {command.line(False, run.name)}" if command is not None else f" with --run-name {run.name}"
        return f"nothing was trained yet, start it again{again}"
    resume = command.line(True, run.name) if command is not None else f"--resume --run-name {run.name}"
    return f"every checkpoint written is kept, continue with {resume}"


def file_system_message(error: Exception, run) -> str | None:
    """One sentence for a write that the file system refused (every file is written whole or not at all, so what
    was written before is intact); None for any other error."""
    where = storage.written_path(error)
    then = (
        f"continue with --resume --run-name {shlex.quote(run.name)}"
        if run is not None
        else "run the same command again"
    )
    if storage.is_disk_full(error):
        return (
            f"the disk is full{f' (writing {where})' if where else ''}, and everything written before is intact; "
            f"free some space, then {then}."
        )
    if storage.is_refused_write(error):
        return (
            f"{where or 'a file of the run'} cannot be written ({error.strerror}), and everything written before "
            f"is intact; make it writable by this user, then {then}."
        )
    return None


def setup(config: Config, run_name: str | None, resume: bool, plain_baseline: bool = False) -> Trainer:
    """Everything a run needs, checked: its directory (created for a new run and locked, nothing written in it yet;
    `runs.release_runs` removes it again if a check fails), the processes and the device, the criterion, the models,
    the data (with responses for the plain baseline that follows, when `plain_baseline`) and the teacher's cache;
    on a resume, the trainer is restored from the last checkpoint."""
    criterion = config.training_parameters.loss  # the one configue built from the file: the run's criterion
    processes = hardware.start_processes(config)
    run = decided_by_main_process(
        processes,
        lambda: locate_run(
            config.paths.checkpoints,
            config.name,
            run_name,
            resume or config.training_parameters.resume,
            config.training_parameters.checkpoints_name_last,
        ),
    )
    # Before `run_as`, only a criterion that always projects hidden states says so, and FSDP refuses it.
    accelerator = hardware.build_accelerator(
        config, run.directory, records.trackers(config, run), criterion.projects_hidden_states
    )
    teacher_dtype = hardware.teacher_dtype(config)
    with during("loading the tokenizer and the models"):
        tokenizer, teacher, student = models.build_models(config, criterion, teacher_dtype)
    criterion.run_as(fused=hardware.fused_loss(accelerator), cached_teacher=teacher_cache.is_used(config))
    data_spec = dataset.spec_from_config(config)
    # The main process fills the tokenized-data cache, the others read it.
    with during("tokenizing the data (or reading its cache)"), accelerator.main_process_first():
        splits = dataset.prepare_splits(
            data_spec, tokenizer, config.paths.data_folder, config.paths.token_dataset, config.data.num_proc
        )
    models_read = [student.config] + ([teacher.config] if teacher is not None else [])
    responses.check_setup(config, tokenizer, models_read, splits, plain_baseline)
    # After the data: the template that rendered it depends on its format, and must not enter its cache key.
    checkpoints.set_generation_defaults(
        tokenizer, student, dataset.training_chat_template(data_spec, tokenizer, splits), config.data.max_length
    )
    with during("answering the validation and test prompts with the teacher"):
        splits = responses.with_teacher_references(splits, teacher, student.config, tokenizer, config, accelerator)
    with during("building the teacher cache (or reading it)"):
        cached_teacher = teacher_cache.prepare(
            config, accelerator, tokenizer, student.config.vocab_size, splits, teacher_dtype
        )
    trainer = Trainer(config, run, accelerator, tokenizer, teacher, student, splits, criterion, cached_teacher)
    if accelerator.num_processes > 1:
        # Kept until end_processes: freeing DDP's reducer mid-process can wait forever on gloo's threads.
        _KEPT_UNTIL_EXIT.append(trainer)
    with during("restoring the last checkpoint"):
        trainer.restore()
    return trainer


DEFAULT_CONFIG = "config.yaml"


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML configuration file (default: ./config.yaml)")
    parser.add_argument("--run-name", help="name of the run directory (default: <config name>-<timestamp>)")
    parser.add_argument("--resume", action="store_true", help="continue the named run, or the latest of this config")
    parser.add_argument(
        "--plain-baseline",
        action="store_true",
        help="then train the same student without the teacher (loss.ClassicLoss) as <run name>-plain, to compare",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override one config value (repeatable)"
    )
    parser.add_argument("--push", metavar="RUN_DIR", help="push a finished run's best checkpoint to the Hub, and stop")
    parser.add_argument("--model-id", help="with --push: the Hub repository (default: the run's hub.model_id)")
    return parser.parse_args(argv)


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
        except UserError as error:
            outcome = [error]
    broadcast_object_list(outcome)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


if __name__ == "__main__":
    sys.exit(main())
