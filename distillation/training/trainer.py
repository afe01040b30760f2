"""The training loop: epochs of optimizer steps, validation and the best checkpoint, the last checkpoint, resuming,
and graceful stops on SIGINT and SIGTERM.

`Trainer.fit` trains; `Trainer.test_best` evaluates the best checkpoint. A step, an evaluation and a save are public
methods (`step`, `evaluate`, `save`), and `forward` is the one place where the models are called. Its parts: each
process's share of a step (steps.py), the models (networks.py), the checkpoints (checkpoints.RunCheckpoints) and the
signals (stop_signals.py).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from distillation.run import records
from distillation.run.checkpoints import RunCheckpoints, TrainerState, load_model_weights
from distillation.run.identity import run_identity
from distillation.run.runs import RunLocation
from distillation.runtime import hardware
from distillation.settings.schema import Config
from distillation.training import evaluation, generation_figures, networks, responses, samples, steps
from distillation.training.stop_signals import StoppedBySignal, StopSignals
from loss import Criterion, ModelOutput

logger = logging.getLogger("distill")


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
    # Fused: one kernel for all the tensors' updates instead of a dozen passes over them (a tenth of the step's time
    # at GPT-2's shapes on a CPU; PyTorch has it for CPUs and GPUs).
    return torch.optim.AdamW(groups, lr=training.learning_rate, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, training, total_steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[training.lr_scheduler]
    return get_scheduler(
        name, optimizer, num_warmup_steps=min(training.warmup_steps, total_steps), num_training_steps=total_steps
    )


class Trainer:
    """The loop over the training steps (`batches`, `steps`), its validations (`evaluator`, `samples`), checkpoints
    (`checkpoints`) and records; holds where training stands (`state`)."""

    def __init__(
        self,
        config: Config,
        run: RunLocation,
        accelerator,
        tokenizer,
        teacher,
        student,
        splits,
        criterion: Criterion,
        cached_teacher: dict | None = None,
    ) -> None:
        self.config, self.run, self.accelerator, self.training = config, run, accelerator, config.training_parameters
        self.criterion, training = criterion, self.training
        self.batches = steps.StepBatches(splits, tokenizer, config, accelerator, cached_teacher)
        self.total_steps = self.batches.total_steps(training)
        optimizer = build_optimizer(student, training)
        self.scheduler = build_scheduler(optimizer, training, self.total_steps)
        self.networks = nets = networks.Networks(
            accelerator, criterion, student, teacher, optimizer, config.hardware.compile, cached_teacher is not None
        )
        self.state, self.stop_signals = TrainerState(), StopSignals()
        identity = run_identity(student.config, tokenizer, criterion, config, splits["train"])
        self.checkpoints = RunCheckpoints(
            run.directory, training, student, tokenizer, nets.optimizer, self.scheduler, accelerator, identity
        )
        self.steps = steps.OptimizerSteps(
            nets, self.scheduler, training, self._loss, self.batches.stand_in, self.checkpoints
        )
        self.responses = responses.ResponseSource(config.responses, config.seed, nets, tokenizer, self.batches.stand_in)
        figures = generation_figures.GenerationFigures(nets, splits, tokenizer, config)
        self.evaluator = evaluation.Evaluator(nets, self.batches, figures)
        self.metrics = records.MetricsLog(run.directory / "metrics.jsonl", accelerator)
        self.data_format = records.trained_format(splits, config)
        prompts = samples.validation_prompts(splits["validation"], tokenizer, training.sample_prompts)
        self.samples = samples.SamplesLog(run.directory, accelerator, tokenizer, prompts)
        self.started_at, self.elapsed_before = time.time(), 0.0
        top_k = config.teacher.cache_top_k if cached_teacher is not None else None
        per_step = self.batches.batches_per_step
        records.log_setup(student, teacher, top_k, criterion, splits, self.total_steps, per_step, training, accelerator)

    def elapsed(self) -> float:
        """Seconds of the run so far, including those of the processes it was resumed from."""
        return self.elapsed_before + time.time() - self.started_at

    def forward(self, batch: dict) -> tuple[ModelOutput, object]:
        """The student's and the teacher's outputs on a batch, as the criterion reads them (networks.Networks)."""
        return self.networks.forward(batch)

    def _loss(self, batch: dict):
        criterion = self.responses.criterion(batch)  # the run's, or on the student's samples without CE
        with self.accelerator.autocast():  # the fused loss projects in the autocast dtype
            return criterion(*self.forward(batch), batch["labels"])

    # --- training ------------------------------------------------------------------------------------------------

    def fit(self) -> None:
        state = self.state
        if self.run.resume:
            self.metrics.drop_after(state.global_step)
            self.samples.drop_after(state.global_step)
        if state.global_step < self.total_steps:  # a resumed run may already be complete
            with self.stop_signals.deferred():
                for epoch in range(state.epoch, self.training.nb_epochs):
                    if self._train_one_epoch(epoch):
                        break
        if state.last_evaluated_step != state.global_step:
            self.validate()
        if self.checkpoints.last_saved_step != state.global_step:
            self.save_last()
        best = (state.global_step, state.best_validation_loss, state.best_step)
        logger.info("Training done: %d steps; best validation loss %.4f at step %s", *best)

    def _train_one_epoch(self, epoch: int) -> bool:
        """One pass over the training split (from the saved position when resuming); True when the run stops in it
        (max_steps, or a signal)."""
        state, training = self.state, self.training
        epoch_steps = self.batches.epoch(epoch, state.batches_done_in_epoch)
        interval = records.Interval()
        total_batches = self.batches.train_loader.batch_sampler.total
        progress = records.progress_bar(self.accelerator, total_batches, state.batches_done_in_epoch, epoch, training)
        self.networks.student.train()
        for data_step in epoch_steps:
            step = self.responses.prepare(data_step, state.global_step + 1)  # generated responses, if it says so
            self.step(step.batches, step.targets)
            step.count(state)
            interval.tokens += step.tokens
            progress.update(step.global_batches)
            if state.global_step % training.log_every_steps == 0:
                interval = self._log_training(epoch, interval, progress)
            with interval.paused():  # evaluation and checkpoints do not count against tokens per second
                self._after_step()
            if self.stop_signals.received is not None or state.global_step >= (training.max_steps or math.inf):
                progress.close()
                self._stop_for_signal()
                return True
        progress.close()
        self._end_epoch(epoch)
        return False

    def _end_epoch(self, epoch: int) -> None:
        self.state.epoch = epoch + 1
        self.state.batches_done_in_epoch = 0
        if self.state.last_evaluated_step != self.state.global_step:  # not validated at this step by eval_every_steps
            self.validate()
        self.save_last()  # always: the checkpoint must record that the epoch is complete

    def _after_step(self) -> None:
        """Validation and checkpoints every N optimizer steps, as configured."""
        training, step = self.training, self.state.global_step
        if training.eval_every_steps and step % training.eval_every_steps == 0:
            self.validate()
            self.networks.student.train()
        if training.checkpoint_every_steps and step % training.checkpoint_every_steps == 0:
            self.save_last()
            if training.keep_step_checkpoints:
                self.checkpoints.keep_step_copy(step, training.keep_step_checkpoints)

    def step(self, step_batches: list[dict], step_targets: int) -> None:
        """One optimizer step over this process's micro-batches, normalised by `step_targets`, the real target
        tokens of the whole step on every process (steps.OptimizerSteps.take)."""
        self.steps.take(self.state, step_batches, step_targets)

    def _stop_for_signal(self) -> None:
        if self.stop_signals.received is None:
            return
        if self.checkpoints.last_saved_step != self.state.global_step:
            self.save_last()
        raise StoppedBySignal(self.stop_signals.received, self.state.global_step, self.checkpoints.last)

    def _log_training(self, epoch: int, interval: records.Interval, progress) -> records.Interval:
        """The training record of the steps since the last log step; the next interval starts."""
        tokens_per_second = interval.tokens_per_second()
        responses_record = self.responses.interval_record(self.state.global_step, self.steps.sums.steps)
        loss, kd, ce = self.steps.interval_means(self.state)
        record = {
            "loss": loss,
            "kd": kd if self.networks.has_teacher else None,
            "ce": ce,
            "perplexity": evaluation.perplexity(ce),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "tokens_per_s": round(tokens_per_second, 1),  # trained tokens (prompts and generated responses)
            **responses_record,
            "peak_memory_mib": hardware.peak_memory_mib(self.accelerator.device),
        }
        self.metrics.write("train", record, self.state, self.elapsed(), epoch=epoch)
        progress.set_postfix({key: f"{record[key]:.3f}" for key in ("loss", "kd", "ce") if record[key] is not None})
        self.steps.start_interval()
        return records.Interval()

    # --- evaluation ----------------------------------------------------------------------------------------------

    def evaluate(self, split: str) -> dict:
        """The student's figures on a split (see evaluation.evaluate)."""
        return self.evaluator.student(split)

    def validate(self) -> None:
        """The student's validation figures and samples; a better result becomes the best checkpoint."""
        self.steps.check_finite(self.state)
        state, networks = self.state, self.networks
        result = self.evaluate("validation")
        first = state.last_evaluated_step is None  # the teacher writes its samples once
        self.samples.write(state.global_step, networks.student_model, networks.teacher_model if first else None)
        improved = state.record_validation(result, self.training.best_metric)
        self.metrics.write("validation", result, state, self.elapsed())
        records.log_validation(state.global_step, result, improved)
        if improved:
            self.save(self.checkpoints.best)

    def test_best(self) -> None:
        """Evaluate the best checkpoint on the test split (and the teacher once) and write summary.json."""
        load_model_weights(self.checkpoints.best, self.networks.student_model)
        result = self.evaluate("test")
        self.metrics.write("test", result, self.state, self.elapsed())
        teacher = None
        if self.networks.has_teacher:
            teacher = {name: self.evaluator.teacher(name) for name in ("validation", "test")}
        records.log_test(self.state.best_step, result, teacher)
        run, state, best_metric, elapsed = self.run, self.state, self.training.best_metric, self.elapsed()
        records.write_summary(run, state, best_metric, result, teacher, self.accelerator, elapsed, self.data_format)

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def save_last(self) -> None:
        self.save(self.checkpoints.last)
        self.checkpoints.last_saved_step = self.state.global_step

    def save(self, directory: Path) -> None:
        """A checkpoint of the student, the optimizer, the schedule and the loop's state (see checkpoints.py)."""
        self.steps.check_finite(self.state)
        # The loss sums since the last log step travel with the checkpoint, so a resumed run logs the same numbers.
        self.state.interval_sums = self.steps.interval_sums()
        self.state.elapsed_s = round(self.elapsed(), 3)
        self.checkpoints.save(directory, self.state)

    def restore(self) -> None:
        """On a resume, load the last checkpoint (reading only: nothing is written before the run directory)."""
        if self.run.resume:
            self.state = self.checkpoints.restore()
            self.elapsed_before = self.state.elapsed_s
            self.steps.restore_sums(self.state.interval_sums)
