"""The GPU benchmark's code path, run at toy size on the CPU so that it cannot rot where no GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_runs_both_losses_at_toy_size_on_a_cpu():
    completed = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--device", "cpu", "--shape", "tiny", "--steps", "3", "--warmup", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    plain, chunked = figures["DistillationLoss"], figures["ChunkedDistillationLoss"]
    assert plain["real_tokens_per_s"] > 0 and chunked["real_tokens_per_s"] > 0
    assert plain["mfu"] is None  # no card peak on a CPU
    # Both losses trained the same student from the same start on the same batches: the same result.
    assert chunked["final_loss"] == pytest.approx(plain["final_loss"], abs=1e-3)


def test_gpu_benchmark_says_it_needs_a_gpu_without_one():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    completed = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},  # this venv
    )
    assert completed.returncode == 2
    assert "needs a CUDA GPU" in completed.stderr and "Traceback" not in completed.stderr


def test_quality_benchmark_runs_every_method_and_ends_with_its_json():
    """A few steps per method: the table and the JSON line hold every method; the distilled runs see the teacher."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench.quality", "--quick", "--steps", "3", "--samples", "300"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    methods = ("plain", "forward_kl", "reverse_kl", "jsd", "teacher_layers", "cached_top_k")
    assert all(figures[method] > 1.0 for method in methods)
    assert 1.0 < figures["teacher"] < figures["plain"]  # the trained teacher is far ahead of 3 steps of training
    assert figures["teacher_layers"] < figures["forward_kl"]  # starting from the teacher's blocks is far ahead
    assert figures["cached_speedup"] > 0


def test_real_shape_benchmark_runs_at_toy_size_with_or_without_trl():
    """python3 -m bench.real_shape's code path in seconds: both precisions of the project's step, and TRL's rows
    where TRL (the optional bench/requirements.txt) is installed, else skipped and no ratio claimed."""
    import importlib.util

    completed = subprocess.run(
        [sys.executable, "-m", "bench.real_shape", "--shape", "tiny", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    assert figures["real_shape_tokens_per_s"] > 0 and 0 < figures["real_shape_matmul_share"]
    has_trl = importlib.util.find_spec("trl") is not None
    assert (figures["ratio_vs_trl"] is not None and figures["ratio_vs_trl"] > 0) == has_trl


def test_the_on_policy_benchmark_gives_trl_exactly_the_projects_prompts():
    """TRL's DistillationTrainer takes text prompts: bench/on_policy.py writes each prompt's ids as words that its
    tokenizer reads back to the same ids (ids holding a 0 digit included: a special token "0" was cut out of them),
    token 0 pads and the EOS lies past the vocabulary. (The row itself, python3 -m bench.on_policy --shape tiny
    --quick, takes 16 s of CPU, past what the suite can spend on it.)"""
    from bench import on_policy

    prompts = [[0, 10, 305, 1000, 2047], [7], [1306, 260, 2040]]
    tokenizer = on_policy.word_tokenizer(2048, eos_token_id=2048)
    assert [tokenizer(text=on_policy.as_text(prompt))["input_ids"] for prompt in prompts] == prompts
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.padding_side) == (0, 2048, "left")
