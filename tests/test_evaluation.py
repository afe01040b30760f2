"""Evaluation as the criterion runs in training: from the hidden states a chunk at a time, never `(B, T, V)`
logits (the figures themselves are checked against independent computations in test_loss, test_trainer,
test_records and test_teacher_cache)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from assets import hub_standins
from distillation.training import evaluation
from helpers import REPO, write_config
from loss import IGNORE_INDEX, ModelOutput, next_token_cross_entropy


def test_the_cross_entropy_from_hidden_states_is_the_one_from_logits():
    generator = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(2, 150, 8, generator=generator), torch.randn(40, 8, generator=generator)
    labels = torch.randint(0, 37, (2, 150), generator=generator)
    labels[1, 100:] = IGNORE_INDEX
    count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    # 37 of the head's 40 rows: a teacher's extra rows are cropped.
    expected = next_token_cross_entropy(hidden @ head[:37].T, labels) * count
    fused = evaluation.cross_entropy_sum(ModelOutput(hidden=hidden, head=head), labels, 37)
    assert torch.allclose(fused, expected, rtol=1e-5)
    assert torch.allclose(evaluation.cross_entropy_sum(ModelOutput(hidden @ head.T), labels, 37), expected)


def peak_of(call: str, config_file) -> int:
    # A fixed mmap threshold: every block over 1 MiB is mapped and unmapped, so that the peak is that of the live
    # tensors, not of glibc's heap reuse (as bench/throughput.py measures the loss's).
    completed = subprocess.run(
        [sys.executable, "-m", "tests.evaluation_peak", str(config_file), call],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return int(completed.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak resident size in /proc/self")
def test_a_validation_at_gpt2_vocabulary_takes_no_more_memory_than_a_training_step(tmp_path):
    """At GPT-2's vocabulary (50257), a (2, 256, V) float32 logits tensor is 103 MB: a validation that built both
    models' logits, as it did, rose about twice as high as the fused training step; now it stays below it."""
    teacher = tmp_path / "teacher"
    hub_standins.save_gpt2_tokenizer(teacher)
    config = GPT2Config(
        vocab_size=50257,
        n_positions=256,
        n_embd=64,
        n_layer=1,
        n_head=2,
        bos_token_id=50256,
        eos_token_id=50256,
        architectures=["GPT2LMHeadModel"],
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(teacher)
    # Rows of several hundred words: cut at 256 tokens, every batch is 2 x 256.
    rows = hub_standins.alpaca_gpt4_rows(10, seed=1, mean_words=400.0, max_words=700)
    data = hub_standins.write_rows(tmp_path / "rows.jsonl", rows)
    config_file = write_config(
        tmp_path / "config.yaml",
        {
            "name": "peak",
            "paths": {"data_folder": str(tmp_path / "data"), "checkpoints": str(tmp_path / "checkpoints")},
            "teacher": {"name": str(teacher), "dtype": "float32"},
            "distilled_model": {"nb_layers": 1},
            "data": {"dataset": str(data), "max_length": 256, "split": {"train": 0.6, "validation": 0.2, "test": 0.2}},
            "training_parameters": {"batch_size": 2, "optimizer": "adamw", "sample_prompts": 0, "report_to": "none"},
            "hardware": {"device": "cpu", "mixed_precision": "no"},
        },
    )
    step, validation = peak_of("step", config_file), peak_of("validation", config_file)
    assert step > 50 * 2**20  # the measurement sees the step's tensors
    assert validation <= step, (validation, step)
