"""Batching for speed without changing what is learned: length grouping, token-normalised accumulation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch

import dataset
import distill
import models
from distillation.data import batching
from helpers import SHORT, base_config, save_gpt2, write_config
from loss import IGNORE_INDEX


def test_length_grouped_batches_cover_every_sample_once_per_epoch_in_a_new_order():
    lengths = np.random.default_rng(0).integers(1, 300, size=1000)
    sampler = batching.LengthGroupedBatchSampler(lengths, batch_size=16, seed=3, group_batches=8)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == 63  # ceil(1000 / 16)
        flat = [index for batch in batches for index in batch]
        assert sorted(flat) == list(range(1000))
        epochs.append(flat)
    sampler.set_epoch(1)
    assert [index for batch in sampler for index in batch] == epochs[1]  # an epoch is reproducible (resume)
    assert epochs[0] != epochs[1] != epochs[2]


def test_length_grouping_cuts_padding():
    lengths = np.random.default_rng(1).lognormal(4.0, 0.8, size=2000).astype(int) + 2

    def padded_over_real(batches):
        return sum(len(batch) * lengths[batch].max() for batch in batches) / lengths.sum()

    random_order = np.random.default_rng(2).permutation(2000)
    random_batches = [random_order[i : i + 16] for i in range(0, 2000, 16)]
    grouped = [np.asarray(batch) for batch in batching.LengthGroupedBatchSampler(lengths, 16, seed=0)]
    assert padded_over_real(grouped) < 0.6 * padded_over_real(random_batches)


def test_evaluation_batches_go_longest_first():
    lengths = [5, 9, 1, 7]
    assert list(batching.LengthGroupedBatchSampler(lengths, 2, seed=0, shuffle=False)) == [[1, 3], [0, 2]]


@pytest.mark.parametrize("mask_instruction", [False, True])
def test_collator_counts_the_targets_the_loss_scores(mask_instruction):
    samples = [
        {"input_ids": [5, 6, 7, 8, 9], "prompt_length": 2},
        {"input_ids": [5, 6, 7], "prompt_length": 0},
        {"input_ids": [4, 4, 4, 4, 4, 4, 4], "prompt_length": 3},
    ]
    batch = batching.PaddingCollator(0, mask_instruction)(samples)
    assert batch["target_tokens"] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@pytest.fixture(scope="module")
def dropout_free_teacher(tmp_path_factory, tokenizer):
    # No dropout anywhere, so that a batch and its micro-batches see the same network.
    return save_gpt2(
        tmp_path_factory.mktemp("teacher-no-dropout"),
        tokenizer,
        nb_layers=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def test_one_step_does_not_depend_on_the_micro_batch_split(tmp_path, dropout_free_teacher, data_file):
    """8 samples in 1 micro-batch, 2 of 4 or 4 of 2: the same SGD update (SGD shows any change of scale)."""
    values = base_config(tmp_path, dropout_free_teacher, data_file)
    values["data"].update(group_by_length=False, max_length=128)  # the same 8 samples first; lengths that differ
    values["training_parameters"].update(
        optimizer="sgd",
        learning_rate=0.5,
        max_grad_norm=None,
        warmup_steps=0,
        lr_scheduler="constant",
        max_steps=1,
    )
    config_file = write_config(tmp_path / "config.yaml", values)
    results = {}
    for batch_size, accumulation in ((8, 1), (4, 2), (2, 4)):
        name = f"split-{batch_size}x{accumulation}"
        assert (
            distill.main(
                [
                    "--config",
                    str(config_file),
                    "--run-name",
                    name,
                    "--set",
                    f"training_parameters.batch_size={batch_size}",
                    "--set",
                    f"training_parameters.gradient_accumulation_steps={accumulation}",
                ]
            )
            == 0
        )
        results[name] = safetensors.torch.load_file(str(tmp_path / "checkpoints" / name / "last" / "model.safetensors"))
    reference = results.pop("split-8x1")
    for name, weights in results.items():
        for key in reference:
            assert torch.allclose(weights[key], reference[key], atol=1e-6, rtol=0), (name, key)


def test_chunked_loss_trains_like_the_full_logits_loss(tmp_path, dropout_free_teacher, data_file):
    values = base_config(tmp_path, dropout_free_teacher, data_file)
    values["training_parameters"].update(max_steps=4, optimizer="sgd", learning_rate=0.5, max_grad_norm=None)
    config_file = write_config(tmp_path / "config.yaml", values)
    loss_arguments = "alpha: 1.0, beta: 0.5, temperature: 2.0"
    for name, loss_class, extra in (
        ("full", "DistillationLoss", ""),
        ("chunked", "ChunkedDistillationLoss", ", chunk_size: 37"),
    ):
        assert (
            distill.main(
                [
                    "--config",
                    str(config_file),
                    "--run-name",
                    name,
                    "--set",
                    f"training_parameters.loss={{'()': loss.{loss_class}, {loss_arguments}{extra}}}",
                ]
            )
            == 0
        )
    full, chunked = (
        safetensors.torch.load_file(str(tmp_path / "checkpoints" / name / "last" / "model.safetensors"))
        for name in ("full", "chunked")
    )
    for key in full:
        assert torch.allclose(full[key], chunked[key], atol=1e-5), key
    summaries = [
        json.loads((tmp_path / "checkpoints" / name / "summary.json").read_text())["test"]
        for name in ("full", "chunked")
    ]
    assert summaries[0]["loss"] == pytest.approx(summaries[1]["loss"], abs=1e-5)


@pytest.mark.parametrize("mask_instruction", [False, True])
def test_packed_and_unpacked_batches_give_the_same_loss(tokenizer, dropout_free_teacher, rows, mask_instruction):
    from transformers import AutoModelForCausalLM

    from loss import DistillationLoss, ModelOutput

    teacher = AutoModelForCausalLM.from_pretrained(dropout_free_teacher).eval()
    torch.manual_seed(1)
    student = AutoModelForCausalLM.from_config(teacher.config).eval()
    samples = []
    for row in rows[:10]:
        prompt = tokenizer(dataset.alpaca_prompt(row["instruction"], row["input"], SHORT))["input_ids"]
        response = tokenizer(row["output"])["input_ids"]
        samples.append({"input_ids": (prompt + response + [tokenizer.eos_token_id])[:60], "prompt_length": len(prompt)})
    criterion = DistillationLoss(alpha=1.0, beta=0.5, temperature=2.0)

    def loss_of(batch):
        inputs = models.model_inputs(batch)
        with torch.no_grad():
            return criterion(
                ModelOutput(student(**inputs).logits), ModelOutput(teacher(**inputs).logits), batch["labels"]
            )

    padded = batching.PaddingCollator(tokenizer.pad_token_id, mask_instruction)(samples)
    packed = batching.PackingCollator(tokenizer.pad_token_id, 128, mask_instruction)(samples)
    assert packed["input_ids"].size(0) < padded["input_ids"].size(0)  # really packed: fewer rows
    assert packed["target_tokens"] == int((packed["labels"][:, 1:] != IGNORE_INDEX).sum()) == padded["target_tokens"]
    first, second = loss_of(padded), loss_of(packed)
    for term in ("loss", "kd", "ce"):
        assert getattr(first, term).item() == pytest.approx(getattr(second, term).item(), abs=1e-5), term


def test_a_packed_run_trains(tmp_path, config_file):
    assert distill.main(["--config", str(config_file), "--run-name", "packed", "--set", "data.packing=true"]) == 0
    summary = json.loads((tmp_path / "checkpoints" / "packed" / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["test"]["perplexity"] > 1.0


def test_compiled_models_train_like_eager_ones_and_save_plain_checkpoints(tmp_path, dropout_free_teacher, data_file):
    from transformers import AutoModelForCausalLM

    values = base_config(tmp_path, dropout_free_teacher, data_file)
    values["training_parameters"].update(max_steps=3, optimizer="sgd", learning_rate=0.5, max_grad_norm=None)
    config_file = write_config(tmp_path / "config.yaml", values)
    for name, compiled in (("eager", "false"), ("compiled", "true")):
        assert (
            distill.main(["--config", str(config_file), "--run-name", name, "--set", f"hardware.compile={compiled}"])
            == 0
        )
    runs = tmp_path / "checkpoints"
    eager = safetensors.torch.load_file(str(runs / "eager" / "last" / "model.safetensors"))
    compiled = safetensors.torch.load_file(str(runs / "compiled" / "last" / "model.safetensors"))
    assert compiled.keys() == eager.keys()  # no `_orig_mod.` prefixes: the checkpoint is a plain model
    for key in eager:
        assert torch.allclose(compiled[key], eager[key], atol=1e-4), key
    assert AutoModelForCausalLM.from_pretrained(runs / "compiled" / "best").config.n_layer == 1
