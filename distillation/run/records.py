"""A run's records: the console and train.log, metrics.jsonl, summary.json, the trackers (TensorBoard, W&B) and the
loss curves (samples.jsonl is samples.py's). The main process writes them; the others only log warnings."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import logging.handlers
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import dataset
import models
from distillation.base import storage
from distillation.run.checkpoints import TrainerState
from distillation.run.runs import RunLocation
from distillation.runtime import hardware
from distillation.settings.config import dump_config, to_plain_dict
from distillation.settings.schema import Config, ConfigError, report_to_names

logger = logging.getLogger("distill")


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


def start_run_directory(run: RunLocation, config: Config, early_records, accelerator) -> None:
    """Create the run directory (all checks passed), save the resolved config and send the log to train.log."""
    if accelerator.is_main_process:
        run.directory.mkdir(parents=True, exist_ok=True)  # locate_run created and holds it
        config_file = run.directory / ("config.resumed.yaml" if run.resume else "config.yaml")
        dump_config(config, config_file)
        log_file = _LogFile(run.directory / "train.log", encoding="utf-8")
        log_file.setFormatter(early_records.formatter)
        log_file._distill = True
        logging.getLogger().addHandler(log_file)
        early_records.setTarget(log_file)
        early_records.flush()
    logging.getLogger().removeHandler(early_records)
    early_records.close()
    logger.info("%s run %s in %s", "Resuming" if run.resume else "Starting", run.name, run.directory)


class _LogFile(logging.FileHandler):
    """train.log. A line it cannot write (a full disk) is left out without printing a traceback: the console has
    it, and the next checkpoint or metrics record meets the same full disk and stops the run with one sentence."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def trackers(config: Config, run: RunLocation) -> list:
    """The experiment trackers that `training_parameters.report_to` names, through Accelerate: TensorBoard event
    files in `<run>/tensorboard/` (by default whenever tensorboard is installed), and Weights & Biases."""
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
            flat[f"{prefix}{key}"] = (
                value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
            )
    return flat


class MetricsLog:
    """metrics.jsonl, one JSON record per log step, validation and test, also sent to the trackers."""

    def __init__(self, path: Path, accelerator) -> None:
        self.path = path
        self.accelerator = accelerator

    def write(self, split: str, values: dict, state: TrainerState, elapsed_s: float, epoch: int | None = None) -> None:
        record = {
            "split": split,
            "step": state.global_step,
            "epoch": state.epoch if epoch is None else epoch,
            "samples_seen": state.samples_seen,
            "tokens_seen": state.tokens_seen,
            **values,
            "wall_time_s": round(elapsed_s, 3),
        }
        if self.accelerator.is_main_process:
            storage.append_line(self.path, json.dumps(record) + "\n")
        numbers = {f"{split}/{key}": value for key, value in values.items() if isinstance(value, (int, float))}
        self.accelerator.log(numbers, step=state.global_step)  # a no-op without trackers

    def drop_after(self, step: int) -> None:
        """A resumed run replays the steps after its last checkpoint: forget their records, so none is doubled."""
        rewrite_records(
            self.path, self.accelerator, lambda record: record.get("step", 0) <= step and record.get("split") != "test"
        )


def rewrite_records(path: Path, accelerator, keep) -> None:
    """Keep the records of a JSON-lines file for which `keep(record)` is true. The file is replaced whole, so a
    kill or a full disk at this moment leaves the history as it was."""
    if not (accelerator.is_main_process and path.is_file()):
        return
    records, damaged = storage.read_json_lines(path)
    if damaged:
        logger.warning(
            "%s: lines %s are not JSON records (cut by a crash or edited) and are dropped",
            path,
            ", ".join(map(str, damaged)),
        )
    kept = [record for record in records if keep(record)]
    storage.atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


def log_setup(
    student,
    teacher,
    cached_top_k: int | None,
    criterion,
    splits,
    total_steps: int,
    batches_per_step: int,
    training,
    accelerator,
) -> None:
    """What the run trains, against what, on which data, in how many steps and processes."""
    logger.info(
        "Student: %s parameters, %d layers; teacher: %s; loss: %r",
        f"{models.count_parameters(student):,}",
        student.config.num_hidden_layers,
        f"{models.count_parameters(teacher):,} parameters"
        if teacher is not None
        else f"its cached top-{cached_top_k} distributions"
        if cached_top_k
        else "not loaded",
        criterion,
    )
    logger.info(
        "Data: %s; %d optimizer steps of %d samples (%d per process and micro-batch, %d micro-batches, %d "
        "processes, %s)",
        ", ".join(f"{name} {len(splits[name])}" for name in dataset.SPLIT_NAMES),
        total_steps,
        training.batch_size * batches_per_step,
        training.batch_size,
        training.gradient_accumulation_steps,
        accelerator.num_processes,
        {"fsdp": "models sharded with FSDP2", "ddp": "DDP", "none": "alone"}[hardware.distribution(accelerator)],
    )
    logger.info(
        "Precision: %s on %s; teacher %s; loss %s",
        {"bf16": "bf16 autocast", "fp16": "fp16 autocast", "no": "float32"}[accelerator.mixed_precision],
        accelerator.device.type,
        str(teacher.dtype).removeprefix("torch.") if teacher is not None else "not loaded",
        "fused (from hidden states, chunk by chunk)" if criterion.projects_hidden_states else "from full logits",
    )


def log_validation(step: int, result: dict, improved: bool) -> None:
    logger.info(
        "Validation at step %d: loss %.4f, kd %s, ce %.4f, perplexity %.2f%s%s",
        step,
        result["loss"],
        _format(result["kd"]),
        result["ce"],
        result["perplexity"],
        _rouge_l(result),
        " (best so far)" if improved else "",
    )


def log_test(best_step: int | None, result: dict, teacher: dict | None) -> None:
    """The best checkpoint's test figures, and the teacher's perplexities (None: no teacher)."""
    logger.info(
        "Test (best checkpoint, step %s): loss %.4f, kd %s, ce %.4f, perplexity %.2f%s",
        best_step,
        result["loss"],
        _format(result["kd"]),
        result["ce"],
        result["perplexity"],
        _rouge_l(result),
    )
    if teacher is not None:
        logger.info(
            "Teacher: validation perplexity %.2f, test perplexity %.2f",
            teacher["validation"]["perplexity"],
            teacher["test"]["perplexity"],
        )


def _rouge_l(result: dict) -> str:
    """The ROUGE-L of the student's answers, for a run that scores them (training_parameters.generation_prompts)."""
    return f", ROUGE-L {result['rouge_l']:.4f}" if "rouge_l" in result else ""


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def trained_format(splits, config: Config) -> str:
    """What the student was trained on, for its model card: "chat" (conversations, rendered by a chat template;
    chat data alone carries a target_mask), "text" (whole texts of data.text_column) or "alpaca" (Alpaca samples)."""
    if "target_mask" in splits["train"].column_names:
        return "chat"
    return "text" if config.data.text_column is not None else "alpaca"


def write_summary(
    run: RunLocation,
    state: TrainerState,
    best_metric: str,
    test: dict,
    teacher: dict | None,
    accelerator,
    elapsed_s: float,
    data_format: str,
) -> None:
    """summary.json: the run's outcome in one file, the best checkpoint's test figures and the teacher's, and the
    format of the data it was trained on (trained_format)."""
    summary = {
        "run": run.name,
        "data_format": data_format,
        "steps": state.global_step,
        "samples_seen": state.samples_seen,
        "tokens_seen": state.tokens_seen,
        "best_step": state.best_step,
        "best_validation_loss": state.best_validation_loss,
        "best_validation_perplexity": state.best_validation_perplexity,
        "best_metric": best_metric,
        "test": test,
        "teacher": teacher,
        "skipped_batches": state.skipped_batches,
        "processes": accelerator.num_processes,
        "distributed": hardware.distribution(accelerator),
        "mixed_precision": accelerator.mixed_precision,
        "wall_time_s": round(elapsed_s, 2),
    }
    if accelerator.is_main_process:
        storage.atomic_write_text(run.directory / "summary.json", json.dumps(summary, indent=2))


def report_where(run: RunLocation, accelerator, best_name: str) -> None:
    """End of a run: draw its loss curves beside its records and say where everything is. The trackers are
    finished here; the process group is left to `hardware.end_processes`, which needs it for its last barrier
    (Accelerate's `end_training` would destroy it, and the interpreter's teardown of gloo can then abort a rank)."""
    for tracker in accelerator.trackers:
        tracker.finish()
    if not accelerator.is_main_process:
        return
    from distillation.run import plots

    try:
        curves = plots.write_run_curves(run.directory)
    except ImportError:
        curves = None  # matplotlib is not installed: the records are all there, only the picture is missing
    logger.info("Run directory: %s (best checkpoint: %s)", run.directory, run.directory / best_name)
    if curves is not None:
        logger.info("Loss curves: %s (more runs side by side: python3 -m distillation.run.plots RUN_DIR...)", curves)


@dataclass
class RunningSums:
    """Each optimizer step's token-mean loss terms, summed over the steps since the last log step, as tensors on
    the device: no value leaves the device until a log step (or a checkpoint, which saves them)."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    steps: int = 0

    @classmethod
    def zeros(cls, device) -> RunningSums:
        return cls(*(torch.zeros((), device=device) for _ in range(3)))

    @classmethod
    def from_list(cls, values: list[float], device) -> RunningSums:
        # float32 -> Python float -> float32 is exact, so the restored sums are bitwise the saved ones.
        return cls(*(torch.tensor(value, dtype=torch.float32, device=device) for value in values[:3]), int(values[3]))

    def add(self, output, share: float) -> None:
        """Add a micro-batch's terms, weighted by its share of the step's targets: each step adds its token mean."""
        self.loss += output.loss.detach() * share
        self.ce += output.ce.detach() * share
        if output.kd is not None:
            self.kd += output.kd.detach() * share


class Interval:
    """Real tokens since the last log step, and the time they took (evaluation and checkpoints excluded)."""

    def __init__(self) -> None:
        self.started, self.tokens = time.perf_counter(), 0

    def tokens_per_second(self) -> float:
        return self.tokens / (time.perf_counter() - self.started)

    @contextlib.contextmanager
    def paused(self):
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - paused


def progress_bar(accelerator, total: int, done: int, epoch: int, training):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=done,
        desc=f"epoch {epoch + 1}/{training.nb_epochs}",
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
        leave=False,
    )
