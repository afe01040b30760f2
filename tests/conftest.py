"""Tiny local fixtures: a tokenizer trained here, a 2-layer GPT-2 teacher, Alpaca-format data. No network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER" in os.environ:
    # Under pytest-xdist each core has its own worker: one thread per worker (and per child process it starts, which
    # inherits the variable). Two workers of two threads each on two cores spend most of their time spinning in
    # OpenMP's waits for a thread that is descheduled (twice the CPU time for the same test).
    os.environ["OMP_NUM_THREADS"] = "1"

import dataset
from assets import generate_tiny_data
from assets.build_tiny import train_byte_level_tokenizer
from helpers import SHORT, base_config, save_gpt2, write_config


@pytest.fixture(scope="session")
def rows() -> list[dict]:
    return generate_tiny_data.generate(160, seed=1)


@pytest.fixture(scope="session")
def tokenizer(rows):
    texts = [dataset.alpaca_prompt(row["instruction"], row["input"], SHORT) + row["output"] for row in rows]
    return train_byte_level_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    return save_gpt2(tmp_path_factory.mktemp("teacher"), tokenizer, nb_layers=2)


@pytest.fixture(scope="session")
def data_file(tmp_path_factory, rows) -> Path:
    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def config_values(tmp_path, teacher_dir, data_file) -> dict:
    return base_config(tmp_path, teacher_dir, data_file)


@pytest.fixture
def config_file(tmp_path, config_values) -> Path:
    return write_config(tmp_path / "config.yaml", config_values)


def _reset_accelerate_state() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one precision per process, and a run in float32 (the tests' configs) may follow one in bf16
    (the demo's config and `mixed_precision: auto` on a CPU with native bf16, the GPU-default tests): each test
    starts with a fresh state, as Accelerate's own tests do between cases. (A user's process runs one config.)"""
    _reset_accelerate_state()
    yield


@pytest.fixture(autouse=True, scope="module")
def fresh_accelerate_state_per_module():
    """The same before a module's own fixtures, which train a run once for all its tests: pytest sets up a module's
    fixtures before any test's, so the reset above would come too late for them (an autouse fixture comes first in
    its scope)."""
    _reset_accelerate_state()
    yield


# The modules that take longest (a suite run's durations, slowest first): pytest-xdist hands each worker one module
# at a time (pytest.ini: --dist loadfile), so these go first and the quick ones fill in after them, and both workers
# end together rather than one running test_recovery.py alone at the end. A module not named keeps its place.
SLOWEST_MODULES = (
    "test_distributed.py",
    "test_recovery.py",
    "test_on_policy.py",
    "test_records.py",
    "test_batching.py",
    "test_real_shape.py",
    "test_gpu_defaults.py",
    "test_benchmarks.py",
    "test_damaged_inputs.py",
    "test_distill.py",
    "test_damaged_runs.py",
    "test_full_disk.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's own order is kept
