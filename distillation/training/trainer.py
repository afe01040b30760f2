"""The training loop: optimizer steps normalised over every target token of the step, validation and the best
checkpoint, the last checkpoint, resuming, and graceful stops on SIGINT and SIGTERM.

`Trainer.fit` trains; `Trainer.test_best` evaluates the best checkpoint. A step, an evaluation and a save are public
methods (`step`, `evaluate`, `save`), and `forward` is the one place where the models are called.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from distillation.data import batching
import dataset
from distillation.training import evaluation
from distillation.runtime import hardware
import models
from distillation.run import records
from distillation.training import samples
from distillation.training import teacher_cache
from distillation.run.checkpoints import (
    TrainerState,
    run_identity,
    gather_training_states,
    check_best,
    keep_step_snapshot,
    load_model_weights,
    load_trainer_state,
    load_training_state,
    save_checkpoint,
)
from distillation.settings.config import Config
from distillation.run.runs import RunLocation
from loss import Criterion, ModelOutput

logger = logging.getLogger("distill")


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
    """SIGINT and SIGTERM while a run writes to its directory. During the training loop (`deferred`), a signal asks
    the loop to stop after the current optimizer step and its checkpoint; a second one, or one at any other moment
    (a resume rewriting metrics.jsonl, an evaluation, the test), stops at once with `Interrupted`: every file is
    written whole or not at all, so what was written before stays valid.
    """

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._deferring = False
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *_exception) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def _handle(self, number: int, _frame) -> None:
        if not self._deferring or self.received is not None:
            raise Interrupted(number)
        self.received = number
        logger.warning("Received %s: finishing this step, then writing a checkpoint", signal.Signals(number).name)


class Interrupted(KeyboardInterrupt):
    """A signal that stops the run at once (a KeyboardInterrupt, so that no `except Exception` swallows it)."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


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
    """Holds what the loop needs: models, data, optimizer, schedule, state; writes checkpoints and metrics."""

    def __init__(self, config: Config, run: RunLocation, accelerator, tokenizer, teacher, student, splits,
                 criterion: Criterion, cached_teacher: Optional[dict] = None) -> None:
        self.config, self.run, self.accelerator, self.tokenizer = config, run, accelerator, tokenizer
        self.training = config.training_parameters
        self.criterion = criterion
        # The teacher's cached distributions (teacher_cache.py) when configured: then the teacher is never called.
        self.cached_teacher = cached_teacher
        self.has_teacher = teacher is not None or cached_teacher is not None
        self._build_loaders(splits)
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
        # as Accelerate prepared them, and return hidden states rather than logits for a criterion that projects them.
        self.student_model, self.teacher_model = student, teacher
        if criterion.projects_hidden_states:  # the chunked loss always has a teacher
            student, teacher = models.HiddenStates(student), models.HiddenStates(teacher)
        self.student, self.optimizer, self.teacher = hardware.prepare_models(
            accelerator, student, teacher, optimizer, config.hardware.compile
        )
        self.state = TrainerState()
        self.sums = records.RunningSums.zeros(accelerator.device)
        self.last_saved_step: Optional[int] = None
        self.stop_signals = StopSignals()
        self.identity = run_identity(self.student_model.config, tokenizer, criterion, config, splits["train"])
        self.metrics = records.MetricsLog(run.directory / "metrics.jsonl", accelerator)
        self.samples = samples.SamplesLog(run.directory, accelerator, tokenizer, samples.validation_prompts(
            splits["validation"], tokenizer, self.training.sample_prompts))
        self.started_at, self.elapsed_before = time.time(), 0.0
        self.teacher_results: dict[str, dict] = {}  # the frozen teacher's figures per split, computed once
        cached_top_k = config.teacher.cache_top_k if cached_teacher is not None else None
        records.log_setup(self.student_model, self.teacher_model, cached_top_k, criterion, splits, self.total_steps,
                          self.batches_per_step, self.training, accelerator)

    def _build_loaders(self, splits) -> None:
        collate = batching.collator(self.tokenizer.pad_token_id, self.config.data)
        collators = {name: collate for name in dataset.SPLIT_NAMES}
        if self.cached_teacher is not None:
            splits = {name: splits[name].add_column("sample_index", np.arange(len(splits[name])))
                      for name in dataset.SPLIT_NAMES}
            collators = {name: teacher_cache.CachedTeacherCollator(collate, self.cached_teacher[name])
                         for name in dataset.SPLIT_NAMES}
        accelerator = self.accelerator
        self.loaders = {
            name: batching.data_loader(
                splits[name], collators[name], self.training.batch_size, self.config.seed, name == "train",
                self.config.data.group_by_length, accelerator.num_processes, accelerator.process_index,
            )
            for name in dataset.SPLIT_NAMES
        }
        self.train_loader = self.loaders["train"]
        # A sample with a target, collated once: the stand-in for a process that has no batch left in an epoch's
        # last step (weighted 0), since every process must take part in each step's gradient reduction.
        self.stand_in_batch = collators["train"]([splits["train"][0]])
        # Real and target tokens per training sample, so that every process knows each step's totals over all
        # processes without communicating (or waiting on the device).
        self.sample_tokens = np.asarray(splits["train"]["length"])
        self.sample_targets = batching.target_counts(
            self.sample_tokens, np.asarray(splits["train"]["prompt_length"]), self.config.data.mask_instruction
        )

    @property
    def last_directory(self) -> Path:
        return self.run.directory / self.training.checkpoints_name_last

    @property
    def best_directory(self) -> Path:
        return self.run.directory / self.training.checkpoints_name_best

    def elapsed(self) -> float:
        """Seconds of the run so far, including those of the processes it was resumed from."""
        return self.elapsed_before + time.time() - self.started_at

    # --- the models ----------------------------------------------------------------------------------------------

    def forward(self, batch: dict) -> tuple[ModelOutput, object]:
        """The student's and the teacher's outputs on a batch, as the criterion reads them: logits (and last hidden
        states if it reads them), or hidden states and output heads; the teacher's cached distributions, or None."""
        inputs = models.model_inputs(batch)
        with self.accelerator.autocast():
            teacher = None
            if self.cached_teacher is not None:
                teacher = teacher_cache.from_batch(batch)
            elif self.teacher is not None:
                with torch.no_grad():
                    teacher = self._outputs(self.teacher, self.teacher_model, inputs)
            student = self._outputs(self.student, self.student_model, inputs)
        return student, teacher

    def _outputs(self, network, language_model, inputs: dict) -> ModelOutput:
        if self.criterion.projects_hidden_states:  # `network` is a models.HiddenStates
            return ModelOutput(hidden=network(**inputs), head=language_model.get_output_embeddings().weight)
        reads_hidden = self.criterion.reads_hidden_states
        output = network(**inputs, output_hidden_states=reads_hidden)
        return ModelOutput(output.logits, output.hidden_states[-1] if reads_hidden else None)

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
        interval = records.Interval()
        progress = records.progress_bar(accelerator, sampler.total, state.batches_done_in_epoch, epoch, training)
        self.student.train()
        for step_start in range(0, len(remaining_batches), self.batches_per_step):
            step_indices = np.concatenate(remaining_batches[step_start : step_start + self.batches_per_step])
            # Global batch k of the step is on process k % processes: this process's share of the step.
            in_step = min(self.batches_per_step, len(remaining_batches) - step_start)
            mine = max(0, -(-(in_step - accelerator.process_index) // accelerator.num_processes))
            self.step([self._place(next(my_batches)) for _ in range(mine)], int(self.sample_targets[step_indices].sum()))
            real_tokens = int(self.sample_tokens[step_indices].sum())
            interval.tokens += real_tokens
            state.tokens_seen += real_tokens
            state.samples_seen += len(step_indices)
            state.batches_done_in_epoch += in_step
            progress.update(in_step)
            state.global_step += 1
            if state.global_step % training.log_every_steps == 0:
                record = self._log_training(epoch, interval.tokens_per_second())
                progress.set_postfix({key: f"{record[key]:.3f}" for key in ("loss", "kd", "ce") if record[key] is not None})
                self.sums = records.RunningSums.zeros(accelerator.device)
                interval = records.Interval()
            with interval.paused():  # evaluation and checkpoints do not count against tokens per second
                self._after_step()
            if self.stop_signals.received is not None or (training.max_steps and state.global_step >= training.max_steps):
                progress.close()
                if self.stop_signals.received is not None:
                    self._stop_for_signal()
                return True
        progress.close()
        state.epoch = epoch + 1
        state.batches_done_in_epoch = 0
        if state.last_evaluated_step != state.global_step:  # not already validated at this step by eval_every_steps
            self.validate()
        self.save_last()  # always: the checkpoint must record that the epoch is complete
        return False

    def _after_step(self) -> None:
        """Validation and checkpoints every N optimizer steps, as configured."""
        training, step = self.training, self.state.global_step
        if training.eval_every_steps and step % training.eval_every_steps == 0:
            self.validate()
            self.student.train()
        if training.checkpoint_every_steps and step % training.checkpoint_every_steps == 0:
            self.save_last()
            if training.keep_step_checkpoints and self.accelerator.is_main_process:
                keep_step_snapshot(self.last_directory, step, training.keep_step_checkpoints,
                                   training.checkpoints_name_best)

    def step(self, step_batches: list[dict], step_targets: int) -> None:
        """One optimizer step over this process's micro-batches, normalised by `step_targets`, the real target
        tokens of the whole step on every process.

        Each micro-batch's loss is a mean over its own targets; weighting it by its share of the step's targets
        makes the gradient the mean over every target of the step, so the update does not depend on how the
        step's samples are split into micro-batches and processes. (DDP averages the processes' gradients, hence
        the factor `num_processes`.)
        """
        accelerator, training = self.accelerator, self.training
        step_targets = max(step_targets, 1)
        # A process with no batch left in an epoch's last step still joins the gradient reduction, with weight 0.
        planned = [(batch, batch["target_tokens"]) for batch in step_batches] or [(self._stand_in(), 0)]
        for index, (batch, targets) in enumerate(planned):
            last = index == len(planned) - 1
            # Gradients are only reduced across processes on the last micro-batch of the step.
            with contextlib.nullcontext() if last else accelerator.no_sync(self.student):
                output = self._loss(batch)
                # Checking every loss costs a device sync, so only the `skip` policy does it.
                if training.on_nonfinite_loss == "skip" and not torch.isfinite(output.loss).item():
                    if not self._skip(last):
                        continue
                    output, targets = self._loss(self._stand_in()), 0
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

    def _loss(self, batch: dict):
        with self.accelerator.autocast():  # the fused loss projects in the autocast dtype
            return self.criterion(*self.forward(batch), batch["labels"])

    def _skip(self, last: bool) -> bool:
        """Count a skipped batch; True when this process must still join the step's gradient reduction (with a
        stand-in of weight 0)."""
        self.state.skipped_batches += 1
        logger.warning("Skipped a batch with a non-finite loss at step %d", self.state.global_step + 1)
        return last and self.accelerator.num_processes > 1

    def _place(self, batch: dict) -> dict:
        return hardware.on_device(batch, self.accelerator)

    def _stand_in(self) -> dict:
        return self._place(self.stand_in_batch)

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

    def _non_finite_loss(self) -> NonFiniteLoss:
        return NonFiniteLoss(self.state.global_step, self.last_directory, self.last_saved_step)

    def _log_training(self, epoch: int, tokens_per_second: float) -> dict:
        count = max(self.sums.steps, 1)
        # The one device sync of the interval: every term leaves the device together.
        loss, kd, ce = (self._global_sums() / count).tolist()
        if self.training.on_nonfinite_loss == "stop" and not math.isfinite(loss):
            raise self._non_finite_loss()
        record = {
            "loss": loss,
            "kd": kd if self.has_teacher else None,
            "ce": ce,
            "perplexity": evaluation.perplexity(ce),
            "learning_rate": self.scheduler.get_last_lr()[0],
            "tokens_per_s": round(tokens_per_second, 1),
            "peak_memory_mib": hardware.peak_memory_mib(self.accelerator.device),
        }
        self.metrics.write("train", record, self.state, self.elapsed(), epoch=epoch)
        return record

    # --- evaluation ----------------------------------------------------------------------------------------------

    def evaluate(self, split: str) -> dict:
        """The student's figures on a split (see evaluation.evaluate)."""
        self.student.eval()
        return evaluation.evaluate(self.criterion, self.forward, self._evaluation_batches(split), self.accelerator,
                                   self.has_teacher)

    def _evaluation_batches(self, split: str):
        return evaluation.padded_batches(self.loaders[split], self.stand_in_batch, self.accelerator.num_processes,
                                         self._place)

    def teacher_result(self, split: str) -> dict:
        """The frozen teacher's figures on a split, computed once per run."""
        if split not in self.teacher_results:
            teacher = None if self.cached_teacher is not None else (
                lambda batch: self._outputs(self.teacher, self.teacher_model, models.model_inputs(batch)))
            self.teacher_results[split] = evaluation.teacher_figures(
                teacher, self.student_model.config.vocab_size, self._evaluation_batches(split), self.accelerator
            )
        return self.teacher_results[split]

    def validate(self) -> None:
        self._check_finite()
        state = self.state
        result = self.evaluate("validation")
        self.samples.write(state.global_step, samples.sampled_networks(
            self.samples.prompts, self.student_model, self.teacher_model, state.last_evaluated_step is None))
        state.last_evaluated_step = state.global_step
        if self.training.best_metric == "perplexity":
            improved = state.best_validation_perplexity is None or result["perplexity"] < state.best_validation_perplexity
        else:
            improved = state.best_validation_loss is None or result["loss"] < state.best_validation_loss
        if improved:
            state.best_validation_loss, state.best_step = result["loss"], state.global_step
            state.best_validation_perplexity = result["perplexity"]
        self.metrics.write("validation", result, state, self.elapsed())
        logger.info(
            "Validation at step %d: loss %.4f, kd %s, ce %.4f, perplexity %.2f%s",
            state.global_step, result["loss"], _format(result["kd"]), result["ce"], result["perplexity"],
            " (best so far)" if improved else "",
        )
        if improved:
            self.save(self.best_directory)

    def test_best(self) -> None:
        """Evaluate the best checkpoint on the test split (and the teacher once) and write summary.json."""
        load_model_weights(self.best_directory, self.student_model)
        result = self.evaluate("test")
        self.metrics.write("test", result, self.state, self.elapsed())
        logger.info(
            "Test (best checkpoint, step %s): loss %.4f, kd %s, ce %.4f, perplexity %.2f",
            self.state.best_step, result["loss"], _format(result["kd"]), result["ce"], result["perplexity"],
        )
        teacher = None
        if self.has_teacher:
            teacher = {name: self.teacher_result(name) for name in ("validation", "test")}
            logger.info("Teacher: validation perplexity %.2f, test perplexity %.2f",
                        teacher["validation"]["perplexity"], teacher["test"]["perplexity"])
        records.write_summary(self.run, self.state, self.training.best_metric, result, teacher, self.accelerator,
                              self.elapsed())

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def save_last(self) -> None:
        self.save(self.last_directory)
        self.last_saved_step = self.state.global_step

    def save(self, directory: Path) -> None:
        """A checkpoint of the student, the optimizer, the schedule and the loop's state (see checkpoints.py)."""
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

    def restore(self) -> None:
        """On a resume, load the last checkpoint (reading only: nothing is written before the run directory)."""
        if not self.run.resume:
            return
        self.state = load_trainer_state(self.last_directory, self.identity)
        if not check_best(self.best_directory) and self.state.best_step is not None:
            logger.warning("The best checkpoint %s is missing: the best validation from now on will be kept there",
                           self.best_directory)
            self.state.best_validation_loss = self.state.best_validation_perplexity = self.state.best_step = None
            self.state.last_evaluated_step = None  # a complete run validates once more, to have a best to test
        self.last_saved_step = self.state.global_step
        self.elapsed_before = self.state.elapsed_s
        if self.state.interval_sums is not None:
            if self.accelerator.is_main_process:
                self.sums = records.RunningSums.from_list(self.state.interval_sums, self.accelerator.device)
            else:  # the saved sums are over all processes: the main process holds them once
                self.sums = records.RunningSums.zeros(self.accelerator.device)
                self.sums.steps = int(self.state.interval_sums[3])
        load_model_weights(self.last_directory, self.student_model)
        load_training_state(
            self.last_directory, self.student_model, self.optimizer, self.scheduler, self.accelerator.scaler
        )
        logger.info(
            "Resumed from %s: epoch %d, step %d, %d batches into the epoch",
            self.last_directory, self.state.epoch + 1, self.state.global_step, self.state.batches_done_in_epoch,
        )


def _format(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"
