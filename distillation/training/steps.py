"""Each process's share of an optimizer step: the training split as steps (which of a step's global batches this
process takes, and the step's token counts over every process), the stand-in batch of a process that has none left,
and the step itself, gradients accumulated over the micro-batches, with the loss terms' running sums that the log
steps report and the checkpoints keep.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import dataset
from distillation.data import batching
from distillation.run import records
from distillation.run.checkpoints import RunCheckpoints, TrainerState
from distillation.runtime import hardware
from distillation.training import evaluation, teacher_cache

logger = logging.getLogger("distill")


class NonFiniteLoss(Exception):
    def __init__(self, step: int, checkpoint: Path, checkpoint_step: int | None) -> None:
        last_good = (
            f"the last good checkpoint is {checkpoint} (step {checkpoint_step})"
            if checkpoint_step is not None
            else "no checkpoint was written yet"
        )
        super().__init__(
            f"the loss became NaN or inf by step {step}, so training stopped without saving those weights; "
            f"{last_good}. Lower the learning rate or check the data, or set "
            f"training_parameters.on_nonfinite_loss: skip to skip such batches."
        )


@dataclass(frozen=True)
class Step:
    """One optimizer step of the training split, as this process takes part in it."""

    batches: list[dict]  # this process's micro-batches, on its device (none in an epoch's last step, possibly)
    targets: int  # the real target tokens of the whole step, on every process
    tokens: int  # the real tokens of the whole step
    samples: int
    global_batches: int  # the step's batches on every process

    def count(self, state: TrainerState) -> None:
        """Add the step, taken, to where training stands."""
        state.tokens_seen += self.tokens
        state.samples_seen += self.samples
        state.batches_done_in_epoch += self.global_batches
        state.global_step += 1


class StepBatches:
    """The splits' data loaders, and the training split as optimizer steps of `batches_per_step` global batches."""

    def __init__(self, splits, tokenizer, config, accelerator, cached_teacher: dict | None) -> None:
        self.accelerator = accelerator
        collate = batching.collator(tokenizer.pad_token_id, config.data)
        if config.responses.generates:  # the training batches carry their prompts, to generate from
            collate = batching.PromptsCollator(collate)
        collators = {name: collate for name in dataset.SPLIT_NAMES}
        if cached_teacher is not None:
            splits = {
                name: splits[name].add_column("sample_index", np.arange(len(splits[name])))
                for name in dataset.SPLIT_NAMES
            }
            collators = {
                name: teacher_cache.CachedTeacherCollator(collate, cached_teacher[name]) for name in dataset.SPLIT_NAMES
            }
        self.loaders = {
            name: batching.data_loader(
                splits[name],
                collators[name],
                config.training_parameters.batch_size,
                config.seed,
                name == "train",
                config.data.group_by_length,
                accelerator.num_processes,
                accelerator.process_index,
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
            self.sample_tokens, np.asarray(splits["train"]["prompt_length"]), config.data.mask_instruction
        )
        # An optimizer step takes `gradient_accumulation_steps` batches on each process: the global batch is
        # batch_size x gradient_accumulation_steps x processes samples.
        self.batches_per_step = config.training_parameters.gradient_accumulation_steps * accelerator.num_processes
        self.steps_per_epoch = math.ceil(self.train_loader.batch_sampler.total / self.batches_per_step)

    def total_steps(self, training) -> int:
        total = self.steps_per_epoch * training.nb_epochs
        return total if training.max_steps is None else min(total, training.max_steps)

    def epoch(self, epoch: int, start: int) -> Iterator[Step]:
        """The steps of an epoch from its global batch `start` on (where a resumed run left it)."""
        sampler = self.train_loader.batch_sampler
        sampler.set_epoch(epoch, start=start)
        return self._steps(sampler.global_batches()[start:], iter(self.train_loader))

    def _steps(self, remaining_batches: list, my_batches: Iterator[dict]) -> Iterator[Step]:
        processes, index = self.accelerator.num_processes, self.accelerator.process_index
        for step_start in range(0, len(remaining_batches), self.batches_per_step):
            step_indices = np.concatenate(remaining_batches[step_start : step_start + self.batches_per_step])
            # Global batch k of the step is on process k % processes: this process's share of the step.
            in_step = min(self.batches_per_step, len(remaining_batches) - step_start)
            mine = max(0, -(-(in_step - index) // processes))
            yield Step(
                [self.place(next(my_batches)) for _ in range(mine)],
                int(self.sample_targets[step_indices].sum()),
                int(self.sample_tokens[step_indices].sum()),
                len(step_indices),
                in_step,
            )

    def evaluation_batches(self, split: str) -> Iterator:
        return evaluation.padded_batches(
            self.loaders[split], self.stand_in_batch, self.accelerator.num_processes, self.place
        )

    def place(self, batch: dict) -> dict:
        return hardware.on_device(batch, self.accelerator)

    def stand_in(self) -> dict:
        return self.place(self.stand_in_batch)


class OptimizerSteps:
    """Optimizer steps over each process's micro-batches, and the sums of their loss terms since the last log step.
    `networks` (networks.Networks) holds the prepared student and its optimizer; `loss` computes a batch's
    criterion output; `stand_in` gives the batch of weight 0 that a process without one
    computes; `checkpoints` names the last good checkpoint when a NaN or inf loss stops the run."""

    def __init__(
        self,
        networks,
        scheduler,
        training,
        loss: Callable[[dict], object],
        stand_in: Callable[[], dict],
        checkpoints: RunCheckpoints,
    ) -> None:
        self.accelerator, self.student, self.optimizer = networks.accelerator, networks.student, networks.optimizer
        self.scheduler, self.training, self.loss = scheduler, training, loss
        self.stand_in, self.checkpoints = stand_in, checkpoints
        self.sums = records.RunningSums.zeros(self.accelerator.device)

    def take(self, state: TrainerState, step_batches: list[dict], step_targets: int) -> None:
        """One optimizer step over this process's micro-batches, normalised by `step_targets`, the real target
        tokens of the whole step on every process.

        Each micro-batch's loss is a mean over its own targets; weighting it by its share of the step's targets
        makes the gradient the mean over every target of the step, so the update does not depend on how the
        step's samples are split into micro-batches and processes. (DDP averages the processes' gradients, hence
        the factor `num_processes`.)
        """
        accelerator = self.accelerator
        step_targets = max(step_targets, 1)
        # A process with no batch left in an epoch's last step still joins the gradient reduction, with weight 0.
        planned = [(batch, batch["target_tokens"]) for batch in step_batches] or [(self.stand_in(), 0)]
        for index, (batch, targets) in enumerate(planned):
            last = index == len(planned) - 1
            # Gradients are only reduced across processes on the last micro-batch of the step.
            with contextlib.nullcontext() if last else accelerator.no_sync(self.student):
                output = self.loss(batch)
                # Checking every loss costs a device sync, so only the `skip` policy does it.
                if self.training.on_nonfinite_loss == "skip" and not torch.isfinite(output.loss).item():
                    if not self._skip(state, last):
                        continue
                    output, targets = self.loss(self.stand_in()), 0
                    if not torch.isfinite(output.loss).item():
                        raise self.non_finite_loss(state)  # even a plain training sample fails: the weights are broken
                share = targets / step_targets
                accelerator.backward(output.loss * share * accelerator.num_processes)
                self.sums.add(output, share)
        self.sums.steps += 1
        self._update()

    def _update(self) -> None:
        if self.training.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(self.student.parameters(), self.training.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _skip(self, state: TrainerState, last: bool) -> bool:
        """Count a skipped batch; True when this process must still join the step's gradient reduction (with a
        stand-in of weight 0)."""
        state.skipped_batches += 1
        logger.warning("Skipped a batch with a non-finite loss at step %d", state.global_step + 1)
        return last and self.accelerator.num_processes > 1

    def interval_means(self, state: TrainerState) -> list[float]:
        """Loss, kd and ce per step since the last log step, over every process: the one device sync of the
        interval, every term leaving the device together."""
        means = (self._global_sums() / max(self.sums.steps, 1)).tolist()
        if self.training.on_nonfinite_loss == "stop" and not math.isfinite(means[0]):
            raise self.non_finite_loss(state)
        return means

    def start_interval(self) -> None:
        self.sums = records.RunningSums.zeros(self.accelerator.device)

    def check_finite(self, state: TrainerState) -> None:
        """Never validate or save weights that a NaN or inf loss has reached (one device sync, at those moments)."""
        if self.training.on_nonfinite_loss == "stop" and not torch.isfinite(self._global_sums()[0]).item():
            raise self.non_finite_loss(state)

    def interval_sums(self) -> list:
        """The sums over every process, and their count, as a checkpoint keeps them (TrainerState.interval_sums)."""
        return [*self._global_sums().tolist(), self.sums.steps]

    def restore_sums(self, interval_sums: list | None) -> None:
        if interval_sums is None:
            return
        if self.accelerator.is_main_process:
            self.sums = records.RunningSums.from_list(interval_sums, self.accelerator.device)
        else:  # the saved sums are over all processes: the main process holds them once
            self.sums = records.RunningSums.zeros(self.accelerator.device)
            self.sums.steps = int(interval_sums[3])

    def _global_sums(self) -> torch.Tensor:
        """Loss, kd and ce summed since the last log step over every process (each holds its own shares)."""
        sums = torch.stack([self.sums.loss, self.sums.kd, self.sums.ce])
        return self.accelerator.reduce(sums, reduction="sum") if self.accelerator.num_processes > 1 else sums

    def non_finite_loss(self, state: TrainerState) -> NonFiniteLoss:
        return NonFiniteLoss(state.global_step, self.checkpoints.last, self.checkpoints.last_saved_step)
