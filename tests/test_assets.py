"""The embedded demo: shipped data that its generator rebuilds, a teacher that knows it, a config that runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import dataset
import distill
import models
from assets import generate_tiny_data
from distillation.data import batching
from distillation.settings import templates
from helpers import REPO
from loss import next_token_cross_entropy

TINY = REPO / "assets" / "tiny"
SHORT = templates.PROMPT_TEMPLATES["alpaca_short"]  # the template the demo's teacher was trained on


def test_shipped_data_is_what_the_generator_writes():
    shipped = [json.loads(line) for line in (TINY / "alpaca_tiny.jsonl").read_text().splitlines()]
    assert shipped == generate_tiny_data.generate(3000, seed=0)
    assert generate_tiny_data.generate(50, seed=7) == generate_tiny_data.generate(50, seed=7)
    assert generate_tiny_data.generate(50, seed=7) != generate_tiny_data.generate(50, seed=8)


def test_the_generator_runs_as_a_module_from_the_repository_root(tmp_path):
    out = tmp_path / "rows.jsonl"
    completed = subprocess.run(
        [sys.executable, "-m", "assets.generate_tiny_data", "--out", str(out), "--n", "20", "--seed", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == generate_tiny_data.generate(20, seed=3)


def test_shipped_assets_stay_small():
    total = sum(path.stat().st_size for path in TINY.rglob("*") if path.is_file())
    assert total < 10 * 1024 * 1024


def test_shipped_teacher_knows_the_data():
    """Far below the uniform cross-entropy log(2048) = 7.6 on samples it was not trained on."""
    tokenizer = models.load_tokenizer(str(TINY / "teacher"))
    teacher = models.load_teacher(str(TINY / "teacher"))
    rows = generate_tiny_data.generate(40, seed=12345)  # fresh samples of the same families
    collate = batching.PaddingCollator(tokenizer.pad_token_id)
    samples = []
    for row in rows:
        prompt = tokenizer(dataset.alpaca_prompt(row["instruction"], row["input"], SHORT))["input_ids"]
        response = tokenizer(row["output"])["input_ids"]
        samples.append({"input_ids": (prompt + response + [tokenizer.eos_token_id])[:256], "prompt_length": 0})
    batch = collate(samples)
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert next_token_cross_entropy(logits, batch["labels"]).item() < 1.5


def test_demo_config_runs(tmp_path):
    status = distill.main(
        [
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
            "--run-name",
            "demo",
            "--set",
            f"teacher.name={TINY / 'teacher'}",
            "--set",
            f"data.dataset={TINY / 'alpaca_tiny.jsonl'}",
            "--set",
            f"paths.data_folder={tmp_path / 'data'}",
            "--set",
            f"paths.checkpoints={tmp_path / 'checkpoints'}",
            "--set",
            "data.max_samples=200",
            "--set",
            "training_parameters.max_steps=4",
        ]
    )
    assert status == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "demo" / "best").config.n_layer == 2
    # mixed_precision: auto chose by this CPU's instructions, as /proc/cpuinfo lists them (an independent reading).
    summary = json.loads((tmp_path / "checkpoints" / "demo" / "summary.json").read_text())
    assert summary["mixed_precision"] == ("bf16" if cpu_has_native_bf16() else "no")


def cpu_has_native_bf16() -> bool:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's /proc/cpuinfo")
def test_auto_precision_follows_the_cpu_and_an_explicit_choice_wins(tmp_path):
    from distillation.runtime import hardware
    from distillation.settings.config import load_config

    native = cpu_has_native_bf16()
    auto = load_config(REPO / "configs" / "tiny.yaml", ["hardware.device=cpu"])
    assert hardware.mixed_precision(auto) == ("bf16" if native else "no")
    assert hardware.teacher_dtype(auto) == (torch.bfloat16 if native else torch.float32)
    chosen = load_config(
        REPO / "configs" / "tiny.yaml", ["hardware.device=cpu", "hardware.mixed_precision=no", "teacher.dtype=float32"]
    )
    assert (hardware.mixed_precision(chosen), hardware.teacher_dtype(chosen)) == ("no", torch.float32)
