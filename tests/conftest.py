"""Tiny local fixtures: a tokenizer trained here, a 2-layer GPT-2 teacher, Alpaca-format data. No network."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "assets"))

import generate_tiny_data  # noqa: E402

import dataset  # noqa: E402
import models  # noqa: E402


# The tests' runs format their samples without Stanford Alpaca's preamble, so that short rows keep room for the
# response (the default template has its own tests).
SHORT = dataset.PROMPT_TEMPLATES["alpaca_short"]


@pytest.fixture(scope="session")
def rows() -> list[dict]:
    return generate_tiny_data.generate(160, seed=1)


@pytest.fixture(scope="session")
def tokenizer(rows):
    texts = [dataset.alpaca_prompt(row["instruction"], row["input"], SHORT) + row["output"] for row in rows]
    return models.train_byte_level_tokenizer(texts, vocab_size=400)


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


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    return save_gpt2(tmp_path_factory.mktemp("teacher"), tokenizer, nb_layers=2)


@pytest.fixture(scope="session")
def data_file(tmp_path_factory, rows) -> Path:
    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


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
        "teacher": {"name": str(teacher_dir)},
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
        "hardware": {"device": "cpu"},
    }


def write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


@pytest.fixture
def config_values(tmp_path, teacher_dir, data_file) -> dict:
    return base_config(tmp_path, teacher_dir, data_file)


@pytest.fixture
def config_file(tmp_path, config_values) -> Path:
    return write_config(tmp_path / "config.yaml", config_values)
