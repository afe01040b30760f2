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
import logging
import signal
import sys
from typing import Optional

import checkpoints
import dataset
import hardware
import models
import records
import runs
import storage
import teacher_cache
from checkpoints import CheckpointError
from config import Config, ConfigError, load_config
from dataset import DataError
from models import ModelError
from runs import PLAIN_BASELINE_SUFFIX, locate_run
from trainer import NonFiniteLoss, StoppedBySignal, Trainer

logger = logging.getLogger("distill")

# Mistakes a user can fix: shown as one sentence, exit code 2.
USER_ERRORS = (ConfigError, ModelError, DataError, CheckpointError)
EXIT_USER_ERROR = 2
EXIT_NON_FINITE_LOSS = 3

_KEPT_UNTIL_EXIT: list = []
PLAIN_LOSS_OVERRIDE = "training_parameters.loss={'()': loss.ClassicLoss}"


def main(argv: Optional[list[str]] = None) -> int:
    arguments = parse_arguments(argv)
    status, run = train(arguments.config, arguments.set, arguments.run_name, arguments.resume)
    if status == 0 and arguments.plain_baseline:
        # The same config, seed, data and steps, with plain next-token training: the comparison distillation needs.
        baseline = run.directory.with_name(run.name + PLAIN_BASELINE_SUFFIX)
        resume = arguments.resume and baseline.exists()
        status, _ = train(arguments.config, [*arguments.set, PLAIN_LOSS_OVERRIDE], baseline.name, resume)
    hardware.end_processes(status)
    return status


def train(config_file: str, overrides: list[str], run_name: Optional[str], resume: bool):
    """One run, from the config to the tested best checkpoint: (exit status, its RunLocation or None)."""
    early_records = records.setup_console_logging()
    run = None
    try:
        config = load_config(config_file, overrides)
        trainer = setup(config, run_name, resume)
        run, accelerator = trainer.run, trainer.accelerator
        with trainer.stop_signals:  # from the first file written in the run directory to the last
            records.start_run_directory(run, config, early_records, accelerator)
            records.start_trackers(accelerator, config, trainer.state)
            trainer.fit()
            trainer.test_best()
            records.report_where(run, accelerator)
    except USER_ERRORS as error:
        logger.error("error: %s", error)
        return EXIT_USER_ERROR, run
    except StoppedBySignal as stop:
        logger.error("%s", stop)
        return 128 + stop.signal_number, run
    except NonFiniteLoss as error:
        logger.error("error: %s", error)
        return EXIT_NON_FINITE_LOSS, run
    except KeyboardInterrupt as interrupt:  # Ctrl-C before the run started, a second signal, or one outside the loop
        number = getattr(interrupt, "signal_number", signal.SIGINT)
        then = f"every checkpoint written is kept, continue with --resume --run-name {run.name}" if run is not None \
            else "the run had not started, run the same command again"
        logger.error("stopped by %s; %s", signal.Signals(number).name, then)
        return 128 + number, run
    except Exception as error:  # a file system that refuses a write: full, read-only or another user's
        message = file_system_message(error, run)
        if message is None:
            raise
        logger.error("error: %s", message)
        return EXIT_USER_ERROR, run
    finally:
        records.close_log_handlers()
        runs.release_runs()
    return 0, run


def file_system_message(error: Exception, run) -> Optional[str]:
    """One sentence for a write that the file system refused (every file is written whole or not at all, so what
    was written before is intact); None for any other error."""
    where = storage.written_path(error)
    then = f"continue with --resume --run-name {run.name}" if run is not None else "run the same command again"
    if storage.is_disk_full(error):
        return (f"the disk is full{f' (writing {where})' if where else ''}, and everything written before is intact; "
                f"free some space, then {then}.")
    if storage.is_refused_write(error):
        return (f"{where or 'a file of the run'} cannot be written ({error.strerror}), and everything written before "
                f"is intact; make it writable by this user, then {then}.")
    return None


def setup(config: Config, run_name: Optional[str], resume: bool) -> Trainer:
    """Everything a run needs, checked: its directory (created for a new run and locked, nothing written in it yet;
    `runs.release_runs` removes it again if a check fails), the processes and the device, the criterion, the models,
    the data and the teacher's cache; on a resume, the trainer is restored from the last checkpoint."""
    loss_spec, cached = config.training_parameters.loss, teacher_cache.is_used(config)
    criterion = loss_spec.build(cached_teacher=cached)
    processes = hardware.start_processes(config)
    run = decided_by_main_process(processes, lambda: locate_run(
        config.paths.checkpoints, config.name, run_name, resume or config.training_parameters.resume,
        config.training_parameters.checkpoints_name_last,
    ))
    accelerator = hardware.build_accelerator(config, run.directory, records.trackers(config, run),
                                             criterion.projects_hidden_states)
    teacher_dtype = hardware.teacher_dtype(config)
    tokenizer, teacher, student = models.build_models(config, criterion, teacher_dtype)
    template = dataset.prompt_template(config.data.template) if config.data.text_column is None else None
    checkpoints.set_generation_defaults(tokenizer, student, template, config.data.max_length)
    criterion = loss_spec.build(cached_teacher=cached, fused=hardware.fused_loss(accelerator))
    with accelerator.main_process_first():  # the main process fills the tokenized-data cache, the others read it
        splits = dataset.prepare_splits(dataset.spec_from_config(config), tokenizer, config.paths.data_folder,
                                        config.paths.token_dataset, config.data.num_proc)
    cached_teacher = teacher_cache.prepare(config, accelerator, tokenizer, student.config.vocab_size, splits,
                                           teacher_dtype)
    trainer = Trainer(config, run, accelerator, tokenizer, teacher, student, splits, criterion, cached_teacher)
    if accelerator.num_processes > 1:
        # Kept until end_processes: freeing DDP's reducer mid-process can wait forever on gloo's threads.
        _KEPT_UNTIL_EXIT.append(trainer)
    trainer.restore()
    return trainer


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


if __name__ == "__main__":
    sys.exit(main())
