"""Helpers shared by the tests: tiny models and configs built locally, and readers of a run's artefacts.
Fixtures are in conftest.py; test modules import these functions from here."""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
import yaml

import dataset

REPO = Path(__file__).resolve().parent.parent

# The tests' runs format their samples without Stanford Alpaca's preamble, so that short rows keep room for the
# response (the default template has its own tests).
SHORT = dataset.PROMPT_TEMPLATES["alpaca_short"]


def save_gpt2(directory: Path, tokenizer, nb_layers: int, width: int = 32, vocab_size: int | None = None, seed: int = 0,
              **config_overrides):
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
    schedule, clipping and batching are written out (the defaults are the seed project's)."""
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
