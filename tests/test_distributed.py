"""Several processes (torchrun, CPU, gloo): the same training as one process, disjoint shards, one copy of each record
and checkpoint, and resuming with another number of processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import distill
from distillation.data import batching
from helpers import REPO, base_config, read_metrics, save_gpt2, weights, write_config


@pytest.mark.parametrize("processes", [1, 2, 3])
@pytest.mark.parametrize("start", [0, 5])
@pytest.mark.parametrize("group_by_length", [True, False])
def test_processes_share_out_each_epoch_disjointly_and_completely(processes, start, group_by_length):
    lengths = np.random.default_rng(0).integers(2, 200, size=103)
    shards = []
    for rank in range(processes):
        sampler = batching.EpochBatches(
            lengths, 8, seed=4, group_by_length=group_by_length, num_processes=processes, process_index=rank
        )
        sampler.set_epoch(2, start=start)
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1])
    reference = batching.EpochBatches(lengths, 8, seed=4, group_by_length=group_by_length)
    reference.set_epoch(2)
    expected = reference.global_batches()[start:]  # the order does not depend on the number of processes
    for rank, shard in enumerate(shards):
        assert shard == expected[rank::processes]
    seen = [index for shard in shards for batch in shard for index in batch]
    assert sorted(seen) == sorted(index for batch in expected for index in batch)
    assert len(seen) == len(set(seen))
    if start == 0:
        assert sorted(seen) == list(range(103))  # every sample once per epoch


@pytest.fixture(scope="module")
def no_dropout_teacher(tmp_path_factory, tokenizer):
    # No dropout, so that processes and micro-batches see the same network whatever their random streams.
    return save_gpt2(
        tmp_path_factory.mktemp("teacher-ddp"), tokenizer, nb_layers=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )


def torchrun(
    arguments: list[str], processes: int = 2, script: Path = REPO / "distill.py"
) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
            str(script),
            *arguments,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


def assert_same_weights(first: Path, second: Path) -> None:
    expected, actual = weights(first), weights(second)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.allclose(expected[key], actual[key], atol=1e-5, rtol=0), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory, no_dropout_teacher, data_file):
    """Two processes x 1 micro-batch of 9, and one process x 2 micro-batches of 9: the same global batch of 18.
    96 training samples make 11 batches, so the last step of each epoch has one batch: the second process then
    takes part with a stand-in batch of weight 0."""
    root = tmp_path_factory.mktemp("ddp")
    values = base_config(root, no_dropout_teacher, data_file)
    values["training_parameters"].update(batch_size=9, lr_scheduler="constant", warmup_steps=0, eval_every_steps=3)
    # Three prompts over two processes: the second repeats a prompt at weight 0, to generate as often as the first.
    values["training_parameters"]["generation_prompts"] = 3
    values["responses"] = {"max_new_tokens": 8}
    config_file = write_config(root / "config.yaml", values)
    completed = torchrun(["--config", str(config_file), "--run-name", "two"])
    assert completed.returncode == 0, completed.stderr[-3000:]
    train_as_one_process_with_two_micro_batches(config_file)
    return root, config_file, completed


def train_as_one_process_with_two_micro_batches(config_file: Path) -> None:
    """The run `one`: the two processes' global batch, as two accumulation steps of one process."""
    one = [
        "--config",
        str(config_file),
        "--run-name",
        "one",
        "--set",
        "training_parameters.gradient_accumulation_steps=2",
    ]
    assert distill.main(one) == 0


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
    root, _, _ = runs
    checkpoints = root / "checkpoints"
    assert_same_weights(checkpoints / "one" / "last", checkpoints / "two" / "last")
    one, two = (json.loads((checkpoints / name / "summary.json").read_text()) for name in ("one", "two"))
    assert two["steps"] == one["steps"] == 2 * 6
    assert two["samples_seen"] == one["samples_seen"] == 2 * 96  # every training sample once per epoch
    assert two["tokens_seen"] == one["tokens_seen"]
    assert two["test"]["loss"] == pytest.approx(one["test"]["loss"], abs=1e-5)  # evaluation reduced over processes
    assert two["teacher"]["test"]["perplexity"] == pytest.approx(one["teacher"]["test"]["perplexity"], rel=1e-6)
    assert_same_generation_figures(one, two)


def assert_same_generation_figures(one: dict, other: dict) -> None:
    """The test split's generation figures of two runs: each process scored its share of the prompts."""
    for summary in (one, other):
        assert summary["test"]["generation_prompts"] == 3 and summary["test"]["teacher_nll"] > 0
    for key in ("rouge_l", "response_length", "eos_share"):
        assert other["test"][key] == pytest.approx(one["test"][key], abs=1e-6), key
    assert other["test"]["teacher_nll"] == pytest.approx(one["test"]["teacher_nll"], rel=1e-4)


def test_two_processes_write_one_copy_of_each_record_and_checkpoint(runs):
    root, _, completed = runs
    run = root / "checkpoints" / "two"
    assert sorted(path.name for path in (root / "checkpoints").iterdir()) == ["one", "two"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = [(record["split"], record["step"]) for record in records]
    assert len(keys) == len(set(keys))
    assert all(record["generation_prompts"] == 3 for record in records if record["split"] != "train")
    log = (run / "train.log").read_text()
    for step in (3, 6, 9, 12):
        assert log.count(f"Validation at step {step}:") == 1
    assert log.count("Training done") == 1
    assert completed.stderr.count("Training done") == 1  # the other process does not repeat the log
    assert {path.name for path in run.iterdir()} >= {"last", "best", "summary.json", "config.yaml"}
    assert sample_keys(run) == sample_keys(root / "checkpoints" / "one")  # every process generates, one writes


def sample_keys(run: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    return [(record["step"], record["model"], record["prompt_index"], record["prompt"]) for record in records]


def test_a_two_process_run_resumed_as_one_process_continues_correctly(runs):
    root, config_file, _ = runs
    stopped = torchrun(
        ["--config", str(config_file), "--run-name", "two-then-one", "--set", "training_parameters.max_steps=4"]
    )
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    run = root / "checkpoints" / "two-then-one"
    state = json.loads((run / "last" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["batches_done_in_epoch"] == 8  # global batches, both processes
    assert (
        distill.main(
            [
                "--config",
                str(config_file),
                "--run-name",
                "two-then-one",
                "--resume",
                "--set",
                "training_parameters.max_steps=null",
                "--set",
                "training_parameters.gradient_accumulation_steps=2",
            ]
        )
        == 0
    )
    assert_same_weights(root / "checkpoints" / "one" / "last", run / "last")
    steps = [
        json.loads(line)["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "train"
    ]
    assert steps == list(range(2, 13, 2))


def accelerate_launch(arguments: list[str], *launch_options: str) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            *launch_options,
            str(REPO / "distill.py"),
            *arguments,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


def test_accelerate_launch_trains_like_torchrun(runs):
    """`accelerate launch --multi_gpu` starts its processes as torchrun does (on CPUs here, over gloo)."""
    root, config_file, _ = runs
    completed = accelerate_launch(["--config", str(config_file), "--run-name", "accelerate"])
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads((root / "checkpoints" / "accelerate" / "summary.json").read_text())
    assert (summary["processes"], summary["distributed"]) == (2, "ddp")
    assert_same_weights(root / "checkpoints" / "one" / "last", root / "checkpoints" / "accelerate" / "last")


@pytest.fixture(scope="module")
def fsdp_run(runs):
    root, config_file, _ = runs
    completed = torchrun(["--config", str(config_file), "--run-name", "two-fsdp", "--set", "hardware.distributed=fsdp"])
    assert completed.returncode == 0, completed.stderr[-3000:]
    return root / "checkpoints" / "two-fsdp"


def test_fsdp_trains_like_one_process(runs, fsdp_run):
    """Student and teacher sharded over two processes: the same weights, records and teacher figures as one
    process with the same global batch, and a checkpoint that loads as a plain Hugging Face model."""
    root, _, _ = runs
    one = root / "checkpoints" / "one"
    assert_same_weights(one / "last", fsdp_run / "last")
    assert_same_weights(one / "best", fsdp_run / "best")
    expected, actual = (json.loads((run / "summary.json").read_text()) for run in (one, fsdp_run))
    assert (actual["processes"], actual["distributed"]) == (2, "fsdp")
    assert (expected["processes"], expected["distributed"]) == (1, "none")
    assert actual["steps"] == expected["steps"] and actual["samples_seen"] == expected["samples_seen"]
    # Greedy samples of the sharded student and teacher: every process takes part in each forward pass.
    assert sample_keys(fsdp_run) == sample_keys(one) and sample_keys(one)[0][:2] == (3, "student")
    assert actual["test"]["loss"] == pytest.approx(expected["test"]["loss"], abs=1e-5)
    assert actual["test"]["target_tokens"] == expected["test"]["target_tokens"]  # stand-in batches weigh nothing
    assert actual["teacher"]["test"]["perplexity"] == pytest.approx(expected["teacher"]["test"]["perplexity"], rel=1e-6)
    assert_same_generation_figures(expected, actual)  # the sharded student generates, the sharded teacher scores
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fsdp_run / "last")
    assert model.config.architectures == ["GPT2LMHeadModel"]
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # the head is still tied


def test_a_checkpoint_moves_between_fsdp_and_one_process(runs):
    """Two sharded processes to step 4, one process to step 8, two sharded processes to the end: the optimizer
    state, keyed by parameter name, is gathered whole and sharded again, and the end is the one-process run's."""
    root, config_file, _ = runs
    name = "fsdp-one-fsdp"
    first = torchrun(
        [
            "--config",
            str(config_file),
            "--run-name",
            name,
            "--set",
            "hardware.distributed=fsdp",
            "--set",
            "training_parameters.max_steps=4",
        ]
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert (
        distill.main(
            [
                "--config",
                str(config_file),
                "--run-name",
                name,
                "--resume",
                "--set",
                "training_parameters.max_steps=8",
                "--set",
                "training_parameters.gradient_accumulation_steps=2",
            ]
        )
        == 0
    )
    last = torchrun(
        ["--config", str(config_file), "--run-name", name, "--resume", "--set", "hardware.distributed=fsdp"]
    )
    assert last.returncode == 0, last.stderr[-3000:]
    run = root / "checkpoints" / name
    assert_same_weights(root / "checkpoints" / "one" / "last", run / "last")
    steps = [
        json.loads(line)["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "train"
    ]
    assert steps == list(range(2, 13, 2))


END_OF_A_RUN = """
import shutil, sys
from pathlib import Path
import torch
from accelerate import Accelerator
from distillation.runtime import hardware
from distillation.run import records, runs
accelerator = Accelerator(cpu=True)
records.report_where(runs.RunLocation("two", Path(sys.argv[1]), False), accelerator, "best")
print(f"rank {accelerator.process_index}: process group kept {torch.distributed.is_initialized()}", flush=True)
hardware.end_processes(0)
print("interpreter teardown reached", flush=True)
"""


def test_the_end_of_a_run_keeps_the_process_group_for_the_last_barrier_and_skips_the_teardown(runs, tmp_path):
    """The interpreter's teardown of gloo (DDP's reducer, FSDP) can abort a rank or hang after a finished run, so
    each process leaves through `hardware.end_processes`: a barrier, then os._exit. That needs the process group
    alive after the run's records are closed (Accelerate's end_training destroyed it, and the teardown ran)."""
    root, _, _ = runs
    run = shutil.copytree(root / "checkpoints" / "two", tmp_path / "two")
    script = tmp_path / "end_of_a_run.py"
    script.write_text(END_OF_A_RUN)
    completed = torchrun([str(run)], script=script)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert sorted(completed.stdout.split("\n")[:-1]) == [f"rank {rank}: process group kept True" for rank in (0, 1)]
    assert (run / "loss_curves.png").stat().st_size > 0


@pytest.mark.parametrize(
    "setting, sentence",
    [
        ("training_parameters.loss.()=loss.ChunkedDistillationLoss", "error: the chunked loss reads the output head"),
        ("hardware.fsdp_cpu_offload=true", "error: hardware.fsdp_cpu_offload moves sharded weights out of GPU memory"),
    ],
)
def test_fsdp_refuses_what_it_cannot_shard(runs, setting, sentence):
    root, config_file, _ = runs
    completed = torchrun(
        [
            "--config",
            str(config_file),
            "--run-name",
            "fsdp-refused",
            "--set",
            "hardware.distributed=fsdp",
            "--set",
            setting,
        ]
    )
    # Each process stops with the sentence and exit code 2 (torchrun itself then exits 1 with its own report).
    assert completed.returncode != 0 and "(exitcode: 2)" in completed.stderr
    assert completed.stderr.count(sentence) == 2
    assert "[rank0]: Traceback" not in completed.stderr and "[rank1]: Traceback" not in completed.stderr
    assert not (root / "checkpoints" / "fsdp-refused").exists()


@pytest.fixture(scope="module")
def on_policy_runs(tmp_path_factory, no_dropout_teacher, data_file):
    """On-policy (lmbda 1) for one epoch: two processes x 1 micro-batch of 9 (DDP, then FSDP) and one process x 2
    micro-batches of 9. The epoch's last step has one batch: the second process generates from a stand-in's prompts
    with the first (a sharded model needs both at each forward pass) and drops them."""
    root = tmp_path_factory.mktemp("ddp-on-policy")
    values = base_config(root, no_dropout_teacher, data_file)
    # Plain SGD at a large rate: a weight moves by the rate times its gradient, so a gradient that differs shows
    # (Adam's normalised steps make a rounding difference in a near-zero gradient as large as a real one).
    values["training_parameters"].update(
        batch_size=9, nb_epochs=1, optimizer="sgd", learning_rate=1.0, lr_scheduler="constant", warmup_steps=0
    )
    values["training_parameters"]["eval_every_steps"] = 3
    values["responses"] = {"lmbda": 1.0, "max_new_tokens": 5}
    config_file = write_config(root / "config.yaml", values)
    for name, distributed in (("ddp", "ddp"), ("fsdp", "fsdp")):
        arguments = ["--config", str(config_file), "--run-name", name, "--set", f"hardware.distributed={distributed}"]
        completed = torchrun(arguments)
        assert completed.returncode == 0, completed.stderr[-3000:]
    train_as_one_process_with_two_micro_batches(config_file)
    return root / "checkpoints"


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_on_policy_over_two_processes_trains_like_two_accumulation_steps(on_policy_runs, distributed):
    """Each process samples its own rows, drawn from the step and the batch's place in it: the same responses, the
    same loss per generated token over the whole step, and the same weights as one process."""
    one, two = on_policy_runs / "one", on_policy_runs / distributed
    assert_same_weights(one / "last", two / "last")
    expected, actual = read_metrics(one), read_metrics(two)
    assert [(r["split"], r["step"], r["tokens_seen"]) for r in actual] == [
        (r["split"], r["step"], r["tokens_seen"]) for r in expected
    ]
    for expected_record, actual_record in zip(expected, actual, strict=True):
        assert actual_record["loss"] == pytest.approx(expected_record["loss"], abs=1e-5), actual_record["step"]
    train = [record for record in actual if record["split"] == "train"]
    assert sum(record["student_steps"] for record in train) == 6 and train[-1]["step"] == 6
