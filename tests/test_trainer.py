"""The loop's parts through the trainer's public methods: an evaluation, a step, a save and a restore, without a
whole run (the end-to-end runs are in test_distill, test_records and test_recovery)."""

from __future__ import annotations

import pytest
import torch

import distill
from distillation.settings.config import load_config
from helpers import weights


def trainer_for(config_file, run_name: str, resume: bool = False, *overrides: str):
    """A trainer as `python3 distill.py` sets it up, with nothing written to its run directory yet."""
    return distill.setup(load_config(config_file, list(overrides)), run_name, resume)


def test_evaluation_figures_are_per_target_token_whatever_the_batch_size(config_file):
    """The same student on the same split: batches of 8 or of 3 samples give the same figures, because every
    figure is summed over target tokens before it is divided (not averaged over batches)."""
    by_eight, by_three = (
        trainer_for(config_file, f"batches-of-{size}", False, f"training_parameters.batch_size={size}").evaluate(
            "validation"
        )
        for size in (8, 3)
    )
    assert by_eight["target_tokens"] == by_three["target_tokens"] > 0
    for key in ("loss", "kd", "ce", "perplexity", "kl_teacher", "top1_agreement"):
        assert by_three[key] == pytest.approx(by_eight[key], rel=1e-5), key


def test_a_step_changes_the_student_and_a_save_restores_it_exactly(tmp_path, config_file):
    trainer = trainer_for(config_file, "unit", False, "training_parameters.warmup_steps=0")
    before = trainer.evaluate("validation")
    batch = next(iter(trainer.batches.train_loader))
    trainer.step([batch], batch["target_tokens"])
    trainer.state.global_step = 1  # what the loop records after a step
    after = trainer.evaluate("validation")
    assert after["loss"] < before["loss"]  # one AdamW step at 3e-3 on the training batch
    trainer.save_last()

    restored = trainer_for(config_file, "unit", True, "training_parameters.warmup_steps=0")
    assert restored.state.global_step == 1
    assert restored.evaluate("validation") == after
    saved = weights(tmp_path / "checkpoints" / "unit" / "last")
    for name, tensor in restored.networks.student_model.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name]), name
    # The optimizer state came back too: the next step from the restored trainer equals the next step here.
    next_batch = next(iter(restored.batches.train_loader))
    for each in (trainer, restored):
        each.step([next_batch], next_batch["target_tokens"])
    assert restored.evaluate("validation") == trainer.evaluate("validation")
