"""Helpers shared by the tests: tiny models and configs built locally, and readers of a run's artefacts.
Fixtures are in conftest.py; test modules import these functions from here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import yaml

import dataset
from distillation.settings import templates
from distillation.settings.config import load_config

REPO = Path(__file__).resolve().parent.parent

# The tests' runs format their samples without Stanford Alpaca's preamble, so that short rows keep room for the
# response (the default template has its own tests).
SHORT = templates.PROMPT_TEMPLATES["alpaca_short"]


def save_gpt2(
    directory: Path,
    tokenizer,
    nb_layers: int,
    width: int = 32,
    vocab_size: int | None = None,
    seed: int = 0,
    **config_overrides,
):
    """A randomly initialised GPT-2-architecture model saved as a Hugging Face directory, tokenizer included."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size or len(tokenizer),
        n_positions=128,
        n_embd=width,
        n_layer=nb_layers,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config_overrides,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def base_config(tmp_path: Path, teacher_dir: Path, data_file: Path) -> dict:
    """A small, fast configuration whose every path lies in tmp_path or the session fixtures. The optimizer,
    schedule, clipping and batching are written out (the defaults are the original project's)."""
    return {
        "name": "test",
        "seed": 3,
        "paths": {
            "data_folder": str(tmp_path / "data"),
            "token_dataset": "tokenized",
            "checkpoints": str(tmp_path / "checkpoints"),
        },
        "teacher": {"name": str(teacher_dir), "dtype": "float32"},
        "distilled_model": {"nb_layers": 1},
        "data": {"dataset": str(data_file), "max_length": 64, "template": "alpaca_short", "group_by_length": True},
        "training_parameters": {
            "learning_rate": 3e-3,
            "nb_epochs": 2,
            "batch_size": 8,
            "log_every_steps": 2,
            "optimizer": "adamw",
            "lr_scheduler": "cosine",
            "warmup_steps": 2,
            "max_grad_norm": 1.0,
            "checkpoints_name_last": "last",
            "checkpoints_name_best": "best",
            "loss": {"()": "loss.DistillationLoss", "alpha": 1.0, "beta": 0.5, "temperature": 2.0},
        },
        # float32 (as the teacher above), so that the figures do not depend on whether this CPU has native bf16
        # (the auto defaults); the bf16 runs are the GPU-default tests'.
        "hardware": {"device": "cpu", "mixed_precision": "no"},
    }


def write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def weights(directory: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's (or saved model's) weights by name."""
    return safetensors.torch.load_file(str(directory / "model.safetensors"))


def read_metrics(run_directory: Path) -> list[dict]:
    return [json.loads(line) for line in (run_directory / "metrics.jsonl").read_text().splitlines()]


def trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def independent_test_figures(run, teacher_dir) -> tuple[float, float]:
    """KL(teacher || student) at temperature 1 and the teacher's perplexity over the run's test split, per target
    token, one unpadded sample at a time, with the teacher cropped to the student's rows here: (kl, perplexity)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load_config(run / "config.yaml")
    best = run / config.training_parameters.checkpoints_name_best
    tokenizer = AutoTokenizer.from_pretrained(best)
    splits = dataset.prepare_splits(
        dataset.spec_from_config(config), tokenizer, config.paths.data_folder, config.paths.token_dataset
    )
    student = AutoModelForCausalLM.from_pretrained(best, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    rows = student.config.vocab_size
    kl_sum = teacher_nll = count = 0.0
    with torch.no_grad():
        for sample in splits["test"]:
            ids = torch.tensor([sample["input_ids"]])
            student_log_probs = F.log_softmax(student(ids).logits[0, :-1], dim=-1)
            teacher_log_probs = F.log_softmax(teacher(ids).logits[0, :-1, :rows], dim=-1)
            kl_sum += (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum().item()
            teacher_nll -= teacher_log_probs.gather(1, ids[0, 1:, None]).sum().item()
            count += ids.size(1) - 1
    return kl_sum / count, float(torch.tensor(teacher_nll / count).exp())


def check_a_distilled_pretrained_student(run, teacher_dir, pretrained_dir) -> None:
    """The run fine-tuned the pretrained student (its best checkpoint is the pretrained weights, moved a little) and
    measured it against the teacher cropped to the student's vocabulary, as computed independently here."""
    best = load_config(run / "config.yaml").training_parameters.checkpoints_name_best
    started, trained = weights(pretrained_dir), weights(run / best)
    assert started.keys() == trained.keys()
    moved = sum((trained[name] - started[name]).norm() ** 2 for name in started) ** 0.5
    size = sum(tensor.norm() ** 2 for tensor in started.values()) ** 0.5
    assert 0 < moved < 0.01 * size
    summary = json.loads((run / "summary.json").read_text())
    kl, teacher_perplexity = independent_test_figures(run, teacher_dir)
    assert summary["test"]["kl_teacher"] == pytest.approx(kl, rel=1e-3)
    assert summary["teacher"]["test"]["perplexity"] == pytest.approx(teacher_perplexity, rel=1e-3)
    assert "Precision: float32 on cpu; teacher float32;" in (run / "train.log").read_text()
