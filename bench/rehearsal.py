"""Rehearse the real experiment offline: `config.yaml` itself at GPT-2's real shapes, for a few optimizer steps.

    python3 -m bench.rehearsal          # 12-layer teacher, config.yaml's 6-layer student: 11 minutes on 2 CPU cores
    python3 -m bench.rehearsal --set hardware.mixed_precision=bf16     # any config value, as distill.py --set

The Hub repositories are replaced by local stand-ins with their file layout (assets/hub_standins.py): a teacher of
GPT-2 124M's shape with 50260 vocabulary rows (random weights) and GPT-2's own tokenizer, and rows shaped like
Alpaca-GPT4's, with its mean length. `distill.py --config config.yaml` then runs with only `teacher.name` and
`data.dataset` pointed at them, and with the run itself cut short: `max_steps`, a log record every step, and its
files in a work folder. Everything else (student, batch size, gradient accumulation, max length, optimizer, loss,
precision, device) is config.yaml's. From the run's own records it prints the seconds per optimizer step, real
tokens per second and peak memory (steps after the first, which warms up), and an estimate of the full run's time:
config.yaml's steps over all of Alpaca-GPT4 (52,002 rows) at that step time, plus its validations, test and
teacher evaluations at the measured evaluation rate. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from assets import hub_standins

REPO = Path(__file__).resolve().parent.parent
RUN_NAME = "rehearsal"


def run_config_yaml(work: Path, teacher: Path, data: Path, steps: int, overrides: list[str]) -> Path:
    """distill.py on config.yaml with the stand-ins; returns the run directory (exits on a failed run)."""
    command = [
        sys.executable,
        str(REPO / "distill.py"),
        "--config",
        str(REPO / "config.yaml"),
        "--run-name",
        RUN_NAME,
        "--set",
        f"teacher.name={teacher}",
        "--set",
        f"data.dataset={data}",
        "--set",
        f"paths.data_folder={work / 'data'}",
        "--set",
        f"paths.checkpoints={work / 'checkpoints'}",
        "--set",
        f"training_parameters.max_steps={steps}",
        "--set",
        "training_parameters.log_every_steps=1",
        *(argument for override in overrides for argument in ("--set", override)),
    ]
    # Its log goes to this process's stderr as it runs; its stdout (none) would mix with the figures.
    completed = subprocess.run(
        command,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    if completed.returncode != 0:
        raise SystemExit(f"the rehearsal run failed with exit code {completed.returncode} (its log is above)")
    return work / "checkpoints" / RUN_NAME


def figures_of(run_directory: Path, rows: int, full_run) -> dict:
    """Step time, throughput and memory from the run's records, and the estimate of `full_run` (the Config of a
    whole run: config.yaml with the user's overrides, not cut short)."""
    records = [json.loads(line) for line in (run_directory / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_directory / "summary.json").read_text())
    train = [record for record in records if record["split"] == "train"]
    if len(train) < 2:
        raise SystemExit("the rehearsal needs at least 2 optimizer steps (--steps); the first one warms up")
    validation = next(record for record in records if record["split"] == "validation")
    step_seconds = statistics.median(b["wall_time_s"] - a["wall_time_s"] for a, b in zip(train, train[1:]))
    # Evaluation seconds per sample: the final validation, which follows the last training record.
    evaluation_seconds = (validation["wall_time_s"] - train[-1]["wall_time_s"]) / max(
        round(rows * full_run.data.split.validation), 1
    )
    return {
        "step_seconds": round(step_seconds, 2),
        "real_tokens_per_s": round(statistics.median(record["tokens_per_s"] for record in train[1:]), 1),
        "peak_memory_mib": max(record["peak_memory_mib"] for record in train),
        "evaluation_seconds_per_sample": round(evaluation_seconds, 4),
        "tokens_per_sample": round(train[-1]["tokens_seen"] / train[-1]["samples_seen"], 1),
        "processes": summary["processes"],
        **full_run_estimate(full_run, step_seconds, evaluation_seconds, summary["processes"]),
    }


def full_run_estimate(config, step_seconds: float, evaluation_seconds: float, processes: int) -> dict:
    """The whole run over Alpaca-GPT4: its optimizer steps at the measured step time, plus each validation (every
    eval_every_steps and at each epoch end), the test, and the teacher's validation and test passes (counted at
    the student's evaluation rate, an upper bound) at the measured evaluation rate."""
    rows, training, split = hub_standins.ALPACA_GPT4_ROWS, config.training_parameters, config.data.split
    samples_per_step = training.batch_size * training.gradient_accumulation_steps * processes
    steps_per_epoch = math.ceil(round(rows * split.train) / samples_per_step)
    total_steps = steps_per_epoch * training.nb_epochs
    if training.max_steps is not None:
        total_steps = min(total_steps, training.max_steps)
    epoch_ends = {steps_per_epoch * epoch for epoch in range(1, training.nb_epochs + 1)}
    validations = {step for step in epoch_ends if step <= total_steps} | {total_steps}
    if training.eval_every_steps:
        validations |= set(range(training.eval_every_steps, total_steps + 1, training.eval_every_steps))
    evaluated = round(rows * split.validation)
    teacher_passes = 2 if training.loss.requires_teacher else 0
    passes = len(validations) + 1 + teacher_passes  # validations, the test, the teacher's validation and test
    seconds = total_steps * step_seconds + passes * evaluated * evaluation_seconds
    return {
        "full_run_steps": total_steps,
        "full_run_evaluation_passes": passes,
        "full_run_evaluated_samples": evaluated,
        "full_run_hours": round(seconds / 3600, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher-layers", type=int, default=12, help="the stand-in teacher's depth (GPT-2's: 12)")
    parser.add_argument("--rows", type=int, default=160, help="stand-in data rows (60%% train, 20%% validation)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (the first warms up)")
    parser.add_argument("--work", type=Path, help="folder for the stand-ins and the run (default: a temporary one)")
    parser.add_argument(
        "--standins",
        type=Path,
        help="use the stand-ins that python3 -m assets.hub_standins wrote in this folder instead of new ones",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="another config.yaml value, as distill.py --set (repeatable)",
    )
    arguments = parser.parse_args(argv)
    from distillation.settings.config import load_config

    full_run = load_config(REPO / "config.yaml", arguments.set)  # refuses a wrong override before any work
    with tempfile.TemporaryDirectory(prefix="rehearsal-") as temporary:
        work = arguments.work or Path(temporary)
        started = time.perf_counter()
        if arguments.standins is not None:
            teacher = arguments.standins / hub_standins.TEACHER_DIRECTORY
            data = arguments.standins / hub_standins.DATA_FILE
        else:
            teacher, data = hub_standins.build(work, arguments.teacher_layers, arguments.rows)
        run_directory = run_config_yaml(work, teacher, data, arguments.steps, arguments.set)
        rows = len(data.read_text(encoding="utf-8").splitlines())
        figures = figures_of(run_directory, rows, full_run)
        teacher_layers = json.loads((teacher / "config.json").read_text())["n_layer"]
        figures["bench_seconds"] = round(time.perf_counter() - started)
    training = full_run.training_parameters
    print(
        f"config.yaml at real shapes: teacher {teacher_layers} layers (50260 rows), student "
        f"{full_run.distilled_model.nb_layers} layers, width 768, vocabulary 50257; {arguments.steps} optimizer "
        f"steps of {training.batch_size} x {training.gradient_accumulation_steps} samples, "
        f"{figures['tokens_per_sample']} tokens per sample; overrides: {', '.join(arguments.set) or 'none'}"
    )
    print(f"seconds per optimizer step   {figures['step_seconds']:>10}")
    print(f"real tokens per second       {figures['real_tokens_per_s']:>10}")
    print(f"peak memory (MiB)            {figures['peak_memory_mib']:>10}")
    print(f"evaluation s per sample      {figures['evaluation_seconds_per_sample']:>10}")
    print(
        f"full run over Alpaca-GPT4: {figures['full_run_steps']} optimizer steps and "
        f"{figures['full_run_evaluation_passes']} evaluation passes over {figures['full_run_evaluated_samples']} "
        f"samples: about {figures['full_run_hours']} hours on this machine"
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
