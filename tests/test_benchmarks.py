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
        [sys.executable, "-m", "bench.quality", "--compare", "losses", "--quick", "--steps", "3", "--samples", "300"],
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
    # The generation figures are each run's own, from its summary.json: greedy answers of at most 16 tokens (--quick).
    answers = figures["test"]
    for method in methods:
        assert 0 <= answers[method]["rouge_l"] <= 1 and 0 <= answers[method]["eos_share"] <= 1
        assert 1 <= answers[method]["response_length"] <= 16
    assert answers["forward_kl"]["teacher_nll"] > 0 and answers["teacher_layers"]["teacher_nll"] > 0
    assert answers["plain"]["teacher_nll"] is None  # plain training loads no teacher to score its answers


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


def test_quality_benchmark_methods_change_only_what_they_name():
    """Each method of python3 -m bench.quality is a valid config that differs from supervised KD (forward_kl) only in
    what its name says, with the settings of every run shared, so the comparison is at equal steps and data."""
    import argparse

    from bench import quality
    from distillation.settings.config import load_config

    settings = argparse.Namespace(samples=None, steps=150, prompts=64, max_new_tokens=64, student_init="random")
    configs = {
        method: load_config(ROOT / "configs" / "tiny.yaml", quality.overrides(method, 1, settings, Path("/runs")))
        for method in quality.METHODS
    }
    supervised = configs["forward_kl"]
    for config in configs.values():
        training = config.training_parameters
        assert (config.seed, training.max_steps, training.batch_size, config.data) == (1, 150, 16, supervised.data)
        assert (training.generation_prompts, config.responses.max_new_tokens) == (64, 64)
        assert training.best_metric == "perplexity"
    on_policy, mixed, seq_kd = (configs[name] for name in ("on_policy", "mixed", "seq_kd"))
    assert (on_policy.responses.lmbda, on_policy.responses.seq_kd) == (1.0, False)
    assert (mixed.responses.lmbda, mixed.responses.seq_kd) == (0.5, False)
    assert on_policy.training_parameters.loss.divergence == mixed.training_parameters.loss.divergence == "reverse_kl"
    assert repr(on_policy.training_parameters.loss) == repr(configs["reverse_kl"].training_parameters.loss)
    assert (seq_kd.responses.lmbda, seq_kd.responses.seq_kd) == (0.0, True)
    assert repr(seq_kd.training_parameters.loss) == repr(supervised.training_parameters.loss)
    assert supervised.responses.lmbda == 0.0 and not supervised.responses.seq_kd
    assert configs["plain"].student == supervised.student and configs["teacher_layers"].student.init == "uniform"


def test_quality_benchmark_reuses_only_the_runs_it_would_train(tmp_path):
    """--reuse reads a finished run in place of training it only where that run had this command's settings."""
    import argparse

    from bench import quality
    from distillation.settings.config import dump_config, load_config

    settings = argparse.Namespace(samples=300, steps=3, prompts=8, max_new_tokens=16, student_init="random")
    run = tmp_path / "plain-seed0"
    run.mkdir()
    overrides = quality.overrides("plain", 0, settings, tmp_path)
    dump_config(load_config(ROOT / "configs" / "tiny.yaml", overrides), run / "config.yaml")
    quality.check_reused(run, "plain", 0, settings, tmp_path)  # this command's own run
    with pytest.raises(SystemExit, match="other settings"):
        quality.check_reused(run, "forward_kl", 0, settings, tmp_path)
    settings.steps = 4
    with pytest.raises(SystemExit, match="other settings"):
        quality.check_reused(run, "plain", 0, settings, tmp_path)
