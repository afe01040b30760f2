"""End to end on a tiny teacher and data: run directories, checkpoints, resume, plain training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import distill
import models
from distillation.training.trainer import Trainer
from helpers import base_config, read_metrics, weights, write_config


def run_directories(checkpoints: Path) -> list[Path]:
    return sorted(path for path in checkpoints.iterdir() if path.is_dir()) if checkpoints.exists() else []


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, teacher_dir, data_file):
    """One complete distillation run shared by the read-only tests below."""
    root = tmp_path_factory.mktemp("run")
    config_file = write_config(root / "config.yaml", base_config(root, teacher_dir, data_file))
    assert distill.main(["--config", str(config_file), "--run-name", "complete"]) == 0
    return root / "checkpoints" / "complete"


def test_run_directory_holds_config_log_metrics_summary_and_checkpoints(finished_run):
    for name in ("config.yaml", "train.log", "metrics.jsonl", "summary.json", "last", "best"):
        assert (finished_run / name).exists(), name
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["steps"] == 2 * 12  # 96 training samples in batches of 8, two epochs
    assert summary["test"]["kd"] is not None and summary["test"]["perplexity"] > 1.0
    assert "Validation at step" in (finished_run / "train.log").read_text()


def test_without_generation_prompts_the_records_have_no_generation_figures(finished_run):
    """generation_prompts 0 (the default): the validation and test records and summary.json keep their keys."""
    figures = ["loss", "kd", "ce", "perplexity", "kl_teacher", "top1_agreement", "target_tokens"]
    counters = ["split", "step", "epoch", "samples_seen", "tokens_seen"]
    for record in read_metrics(finished_run):
        if record["split"] != "train":
            assert list(record) == [*counters, *figures, "wall_time_s"]
    assert list(json.loads((finished_run / "summary.json").read_text())["test"]) == figures
    assert "ROUGE-L" not in (finished_run / "train.log").read_text()


def test_best_and_last_checkpoints_load_with_from_pretrained(finished_run, tokenizer):
    for name in ("best", "last"):
        model = AutoModelForCausalLM.from_pretrained(finished_run / name)
        assert model.config.num_hidden_layers == 1
        assert models.load_tokenizer(str(finished_run / name)).get_vocab() == tokenizer.get_vocab()
        assert (finished_run / name / "trainer_state.json").is_file()


def test_best_checkpoint_is_the_lowest_validation_loss(finished_run):
    validations = [record for record in read_metrics(finished_run) if record["split"] == "validation"]
    best = min(validations, key=lambda record: record["loss"])
    state = json.loads((finished_run / "best" / "trainer_state.json").read_text())
    assert state["global_step"] == best["step"]
    assert state["best_validation_loss"] == pytest.approx(best["loss"])


def test_training_lowers_the_loss(finished_run):
    train = [record for record in read_metrics(finished_run) if record["split"] == "train"]
    assert len(train) == 12  # one record every 2 of the 24 steps
    assert train[-1]["loss"] < train[0]["loss"] - 0.2
    assert all(record["kd"] is not None and record["tokens_per_s"] > 0 for record in train)


def test_resolved_config_is_saved(finished_run):
    import yaml

    saved = yaml.safe_load((finished_run / "config.yaml").read_text())
    assert saved["training_parameters"]["loss"] == {
        "()": "loss.DistillationLoss",
        "alpha": 1.0,
        "beta": 0.5,
        "temperature": 2.0,
    }
    assert saved["training_parameters"]["optimizer"] == "adamw"


def test_runs_never_overwrite_each_other(tmp_path, config_file, monkeypatch):
    arguments = ["--config", str(config_file), "--set", "training_parameters.max_steps=2"]
    assert distill.main(arguments) == 0
    assert distill.main(arguments) == 0
    first, second = run_directories(tmp_path / "checkpoints")
    assert first.name.startswith("test-") and second.name.startswith("test-")
    before = weights(first / "last")
    assert distill.main(arguments + ["--run-name", first.name]) == 2
    after = weights(first / "last")
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_plain_training_does_not_load_the_teacher(tmp_path, config_file, monkeypatch):
    def refuse(*_arguments, **_options):
        raise AssertionError("the teacher must not be loaded for ClassicLoss")

    monkeypatch.setattr(models, "load_teacher", refuse)
    status = distill.main(
        [
            "--config",
            str(config_file),
            "--run-name",
            "plain",
            "--set",
            "training_parameters.loss={'()': loss.ClassicLoss}",
            "--set",
            "training_parameters.nb_epochs=1",
        ]
    )
    assert status == 0
    summary = json.loads((tmp_path / "checkpoints" / "plain" / "summary.json").read_text())
    assert summary["test"]["kd"] is None
    assert summary["test"]["loss"] == pytest.approx(summary["test"]["ce"])


class Interrupt(KeyboardInterrupt):
    pass


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, config_file, monkeypatch):
    common = ["--config", str(config_file), "--set", "training_parameters.checkpoint_every_steps=5"]
    assert distill.main(common + ["--run-name", "straight"]) == 0

    original = Trainer.step

    def stop_mid_epoch_two(self, step_batches, step_targets):
        if self.state.global_step == 17:
            raise Interrupt()
        return original(self, step_batches, step_targets)

    monkeypatch.setattr(Trainer, "step", stop_mid_epoch_two)
    assert distill.main(common + ["--run-name", "stopped"]) == 130
    stopped = tmp_path / "checkpoints" / "stopped"
    assert json.loads((stopped / "last" / "trainer_state.json").read_text())["global_step"] == 15
    assert not (stopped / "summary.json").exists()

    monkeypatch.setattr(Trainer, "step", original)
    assert distill.main(common + ["--resume", "--run-name", "stopped"]) == 0

    straight = tmp_path / "checkpoints" / "straight"
    expected, resumed = weights(straight / "last"), weights(stopped / "last")
    for key in expected:
        # Bitwise in almost every run; 1e-6 tolerates a last-bit rounding difference of CPU kernels (see
        # test_recovery.py), far below what any resume mistake would change.
        assert (expected[key] - resumed[key]).abs().max().item() <= 1e-6, key
    steps = [record["step"] for record in read_metrics(stopped) if record["split"] == "train"]
    assert steps == [record["step"] for record in read_metrics(straight) if record["split"] == "train"]
    assert (stopped / "config.resumed.yaml").is_file()


def test_resume_without_a_name_takes_the_latest_run_of_the_config(tmp_path, config_file):
    assert distill.main(["--config", str(config_file), "--set", "training_parameters.max_steps=3"]) == 0
    (run,) = run_directories(tmp_path / "checkpoints")
    status = distill.main(
        [
            "--config",
            str(config_file),
            "--resume",
            "--set",
            "training_parameters.max_steps=6",
        ]
    )
    assert status == 0
    assert run_directories(tmp_path / "checkpoints") == [run]
    assert json.loads((run / "last" / "trainer_state.json").read_text())["global_step"] == 6


def test_resume_with_nothing_to_resume_is_a_clear_error(tmp_path, config_file):
    assert distill.main(["--config", str(config_file), "--resume"]) == 2
    assert distill.main(["--config", str(config_file), "--resume", "--run-name", "never"]) == 2
    assert not (tmp_path / "checkpoints").exists()


def test_resume_with_another_model_shape_is_refused(tmp_path, config_file, teacher_dir):
    assert (
        distill.main(["--config", str(config_file), "--run-name", "one", "--set", "training_parameters.max_steps=2"])
        == 0
    )
    before = weights(tmp_path / "checkpoints" / "one" / "last")
    status = distill.main(
        [
            "--config",
            str(config_file),
            "--run-name",
            "one",
            "--resume",
            "--set",
            "distilled_model.nb_layers=2",
        ]
    )
    assert status == 2
    assert not (tmp_path / "checkpoints" / "one" / "config.resumed.yaml").exists()
    after = weights(tmp_path / "checkpoints" / "one" / "last")
    assert all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize(
    "change, named",
    [
        ("training_parameters.batch_size=4", "training_parameters.batch_size"),
        ("seed=4", "seed"),
        ("data.max_length=48", "the tokenized data"),
        ("data.group_by_length=false", "data.group_by_length"),
    ],
)
def test_resume_with_other_batches_is_refused(tmp_path, config_file, caplog, change, named):
    """A checkpoint saves how many of the epoch's batches are done; the same count of other batches is no resume."""
    common = ["--config", str(config_file), "--run-name", "first"]
    assert distill.main([*common, "--set", "training_parameters.max_steps=3"]) == 0
    last = tmp_path / "checkpoints" / "first" / "last"
    before = weights(last)
    caplog.clear()
    assert distill.main([*common, "--resume", "--set", change]) == 2
    assert named in caplog.text and "start a new run without --resume" in caplog.text
    after = weights(last)
    assert all(torch.equal(before[key], after[key]) for key in before)  # nothing trained or saved


@pytest.mark.parametrize(
    "resume", [["--resume"], ["--set", "training_parameters.resume=true"]], ids=["flag", "config file"]
)
def test_a_resumed_run_then_starts_its_plain_baseline(tmp_path, config_file, resume):
    """A run stopped before its baseline started, resumed with `--plain-baseline` and either `--resume` or `resume:
    true` in the config: the run continues, then its baseline starts (the file's resume is not the baseline's)."""
    assert distill.main(["--config", str(config_file), "--set", "training_parameters.max_steps=2"]) == 0
    [distilled] = run_directories(tmp_path / "checkpoints")
    assert (
        distill.main(
            ["--config", str(config_file), "--plain-baseline", *resume, "--set", "training_parameters.max_steps=4"]
        )
        == 0
    )
    assert run_directories(tmp_path / "checkpoints") == [distilled, distilled.with_name(f"{distilled.name}-plain")]
    for run in run_directories(tmp_path / "checkpoints"):
        assert json.loads((run / "last" / "trainer_state.json").read_text())["global_step"] == 4


def test_resume_after_a_plain_baseline_continues_both_runs_in_order(tmp_path, config_file):
    """The README's `--plain-baseline` command, then the same command with `--resume`: the distilled run continues
    first, then its plain baseline; no new run is started."""
    command = ["--config", str(config_file), "--plain-baseline"]
    assert distill.main([*command, "--set", "training_parameters.max_steps=2"]) == 0
    distilled, plain = run_directories(tmp_path / "checkpoints")
    assert plain.name == f"{distilled.name}-plain"
    assert distill.main([*command, "--resume", "--set", "training_parameters.max_steps=4"]) == 0
    assert run_directories(tmp_path / "checkpoints") == [distilled, plain]
    for run in (distilled, plain):
        assert json.loads((run / "last" / "trainer_state.json").read_text())["global_step"] == 4
    assert json.loads((plain / "summary.json").read_text())["test"]["kd"] is None  # still the plain baseline


def test_every_user_error_is_one_class_and_the_error_layer_imports_nothing_heavy():
    """One base class for the errors a user fixes (exit 2, one sentence), in a module that the config, storage and
    data layers can import without torch or transformers."""
    import subprocess
    import sys

    from dataset import DataError
    from distillation.base import errors
    from distillation.run.checkpoints import CheckpointError
    from distillation.run.hub_push import PushError
    from distillation.settings.config import ConfigError

    for error_class in (ConfigError, models.ModelError, DataError, CheckpointError, PushError):
        assert issubclass(error_class, errors.UserError), error_class
    heavy = "import sys, errors; print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))"
    completed = subprocess.run(
        [sys.executable, "-c", heavy], capture_output=True, text=True, check=True, cwd=Path(errors.__file__).parent
    )
    assert completed.stdout.strip() == "[]"
