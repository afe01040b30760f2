"""The student and the teacher as a run calls them: prepared by Accelerate (processes, FSDP, compilation) together
with the optimizer, and returning what the criterion reads."""

from __future__ import annotations

import torch

import models
from distillation.runtime import hardware
from distillation.training import teacher_cache
from loss import Criterion, ModelOutput


class Networks:
    """`student_model` and `teacher_model` are the causal LMs themselves (what checkpoints hold); `student` and
    `teacher` are what is called, as Accelerate prepared them, and return hidden states rather than logits for a
    criterion that projects them. With `cached_teacher` (teacher_cache.py) the teacher is never called: its
    distributions come with the batches. `optimizer` is the student's, as Accelerate wrapped it."""

    def __init__(
        self,
        accelerator,
        criterion: Criterion,
        student,
        teacher,
        optimizer: torch.optim.Optimizer,
        compile_models: bool,
        cached_teacher: bool,
    ) -> None:
        self.accelerator, self.criterion, self.cached_teacher = accelerator, criterion, cached_teacher
        self.has_teacher = teacher is not None or cached_teacher
        self.student_model, self.teacher_model = student, teacher
        if criterion.projects_hidden_states:  # the chunked loss always has a teacher
            student, teacher = models.HiddenStates(student), models.HiddenStates(teacher)
        self.student, self.optimizer, self.teacher = hardware.prepare_models(
            accelerator, student, teacher, optimizer, compile_models
        )

    def forward(self, batch: dict) -> tuple[ModelOutput, object]:
        """The student's and the teacher's outputs on a batch, as the criterion reads them: logits (and last hidden
        states if it reads them), or hidden states and output heads; the teacher's cached distributions, or None."""
        inputs = models.model_inputs(batch)
        with self.accelerator.autocast():
            teacher = None
            if self.cached_teacher:
                teacher = teacher_cache.from_batch(batch)
            elif self.teacher is not None:
                with torch.no_grad():
                    teacher = self._outputs(self.teacher, self.teacher_model, inputs)
            student = self._outputs(self.student, self.student_model, inputs)
        return student, teacher

    def teacher_outputs(self, batch: dict) -> ModelOutput:
        """The teacher's outputs on a batch as the criterion reads them, for the teacher's own figures."""
        return self._outputs(self.teacher, self.teacher_model, models.model_inputs(batch))

    def _outputs(self, network, language_model, inputs: dict) -> ModelOutput:
        if self.criterion.projects_hidden_states:  # `network` is a models.HiddenStates
            return ModelOutput(hidden=network(**inputs), head=language_model.get_output_embeddings().weight)
        reads_hidden = self.criterion.reads_hidden_states
        output = network(**inputs, output_hidden_states=reads_hidden)
        return ModelOutput(output.logits, output.hidden_states[-1] if reads_hidden else None)
