"""What a GPU run gets by default, run on the CPU: bf16 autocast and a bfloat16 teacher (`mixed_precision: auto` and
`teacher.dtype: auto` on a recent GPU), crossed with every loss and data variant, through whole runs of distill.py
(a few steps, validations, the best checkpoint's test). A path that only a GPU run would take is a path nobody ran."""

from __future__ import annotations

import json
import math

import pytest
import torch

import distill
from helpers import read_metrics, weights

GPU_DEFAULTS = ["hardware.mixed_precision=bf16", "teacher.dtype=bfloat16"]
SHORT_RUN = [
    "training_parameters.max_steps=3",
    "training_parameters.eval_every_steps=1",
    "training_parameters.warmup_steps=0",
    "training_parameters.report_to=none",
]
VARIANTS = {
    **{
        divergence: [f"training_parameters.loss.divergence={divergence}"]
        for divergence in ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv")
    },
    "chunked": ["training_parameters.loss={'()': loss.ChunkedDistillationLoss, temperature: 2, chunk_size: 16}"],
    "hidden cosine": ["training_parameters.loss.hidden_weight=0.5"],
    "cached top-k": ["teacher.cache_top_k=8", "training_parameters.loss.temperature=1"],
    "packing": ["data.packing=true"],
    "length groups with accumulation": [
        "data.group_by_length=true",
        "training_parameters.gradient_accumulation_steps=2",
    ],
    "teacher-layer init": ["student.init=teacher_layers", "student.teacher_layers=[1]"],
    "plain CE": ["training_parameters.loss={'()': loss.ClassicLoss}"],
    "chat messages, assistant turns": ["data.dataset={chat_file}", "data.mask_instruction=true"],
    "on-policy, reverse KL": [
        "responses.lmbda=1",
        "responses.max_new_tokens=6",
        "training_parameters.loss.divergence=reverse_kl",
    ],
    "mixed on-policy and packed data steps": ["responses.lmbda=0.5", "responses.max_new_tokens=6", "data.packing=true"],
    "sequence-level KD on chat": [
        "responses.seq_kd=true",
        "responses.max_new_tokens=6",
        "data.dataset={chat_file}",
        "data.mask_instruction=true",
    ],
}


@pytest.fixture
def chat_file(tmp_path, rows):
    """The fixtures' rows as a messages file (chat_data.py), with a system turn in every other conversation."""
    path = tmp_path / "chat.jsonl"
    with path.open("w") as handle:
        for index, row in enumerate(rows):
            system = [{"role": "system", "content": "Answer briefly."}] if index % 2 else []
            turns = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]
            handle.write(json.dumps({"messages": system + turns}) + "\n")
    return path


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_the_gpu_defaults_run_every_loss_and_data_variant_on_a_cpu(tmp_path, config_file, chat_file, variant):
    arguments = ["--config", str(config_file), "--run-name", "bf16"]
    for override in GPU_DEFAULTS + SHORT_RUN + variant:
        arguments += ["--set", override.replace("{chat_file}", str(chat_file))]
    assert distill.main(arguments) == 0
    run = tmp_path / "checkpoints" / "bf16"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mixed_precision"] == "bf16" and summary["steps"] == 3
    validations = [record for record in read_metrics(run) if record.get("split") == "validation"]
    assert [record["step"] for record in validations] == [1, 2, 3]
    train = [record for record in read_metrics(run) if record.get("split") == "train"]
    if "responses.seq_kd=true" in variant:
        # Trained on the (random) teacher's generations, not on the data that validation scores: 3 steps need not
        # lower its validation loss; every step trained on them.
        assert sum(record["teacher_steps"] for record in train) == train[-1]["step"] > 0
    else:
        assert validations[-1]["loss"] < validations[0]["loss"]  # it learns, in bf16 too
    for figures in (*validations, summary["test"]):
        for key in ("loss", "ce", "kd", "kl_teacher", "top1_agreement"):
            assert figures[key] is None or math.isfinite(figures[key]), key
    best = weights(run / "best")  # the student is trained and saved in float32 whatever the autocast
    assert all(tensor.dtype == torch.float32 and torch.isfinite(tensor).all() for tensor in best.values())
