"""samples.jsonl: the student's greedy continuations of fixed validation prompts at each validation, the teacher's
once, in the TensorBoard events as text, and the same after a resume as in a straight run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import dataset
import distill
import models
from distillation.settings.config import ConfigError, load_config
from helpers import base_config, write_config


def read_samples(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]


def sampled_config(tmp_path: Path, teacher_dir: Path, data_file: Path, **training) -> Path:
    values = base_config(tmp_path, teacher_dir, data_file)
    values["training_parameters"].update({"max_steps": 8, "eval_every_steps": 4, "sample_prompts": 2, **training})
    return write_config(tmp_path / "config.yaml", values)


def validation_rows(config_file: Path, teacher_dir: Path):
    config = load_config(config_file)
    tokenizer = models.load_tokenizer(str(teacher_dir))
    splits = dataset.prepare_splits(
        dataset.spec_from_config(config), tokenizer, config.paths.data_folder, config.paths.token_dataset
    )
    return tokenizer, splits["validation"]


def test_each_validation_samples_the_student_and_the_first_the_teacher(tmp_path, teacher_dir, data_file):
    config_file = sampled_config(tmp_path, teacher_dir, data_file)
    assert distill.main(["--config", str(config_file), "--run-name", "run"]) == 0
    run = tmp_path / "checkpoints" / "run"
    records = read_samples(run)
    validation_steps = [
        r["step"]
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if r["split"] == "validation"
    ]
    assert validation_steps == [4, 8]
    assert [(r["step"], r["model"], r["prompt_index"]) for r in records] == [
        (4, "student", 0),
        (4, "student", 1),
        (4, "teacher", 0),
        (4, "teacher", 1),
        (8, "student", 0),
        (8, "student", 1),
    ]
    tokenizer, validation = validation_rows(config_file, teacher_dir)
    for record in records:
        row = validation[record["prompt_index"]]
        # The prompt ends where the response starts, as prompt_length marks it; the reference is the response.
        assert record["prompt"] == tokenizer.decode(row["input_ids"][: row["prompt_length"]])
        assert record["prompt"].startswith("### Instruction:")
        ids = row["input_ids"][:-1] if row["input_ids"][-1] == tokenizer.eos_token_id else row["input_ids"]
        assert record["prompt"] + record["reference"] == tokenizer.decode(ids)
        assert isinstance(record["completion"], str) and tokenizer.eos_token not in record["completion"]
    assert any(record["completion"] for record in records)

    # Greedy and deterministic: an identical run writes the same texts.
    assert distill.main(["--config", str(config_file), "--run-name", "again"]) == 0
    assert read_samples(tmp_path / "checkpoints" / "again") == records

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    texts = {
        tag: [(event.step, event.tensor_proto.string_val[0].decode()) for event in events.Tensors(tag)]
        for tag in events.Tags()["tensors"]
        if tag.startswith("samples/")
    }
    assert sorted(texts) == [
        "samples/student/0/text_summary",
        "samples/student/1/text_summary",
        "samples/teacher/0/text_summary",
        "samples/teacher/1/text_summary",
    ]
    assert [step for step, _ in texts["samples/student/0/text_summary"]] == [4, 8]
    assert [step for step, _ in texts["samples/teacher/1/text_summary"]] == [4]
    assert "**Reference**" in texts["samples/student/0/text_summary"][0][1]


def test_a_resumed_run_ends_with_the_samples_of_a_straight_run(tmp_path, teacher_dir, data_file):
    config_file = sampled_config(
        tmp_path, teacher_dir, data_file, eval_every_steps=2, checkpoint_every_steps=4, keep_step_checkpoints=2
    )
    assert distill.main(["--config", str(config_file), "--run-name", "run"]) == 0
    run = tmp_path / "checkpoints" / "run"
    straight = read_samples(run)
    assert sorted({record["step"] for record in straight}) == [2, 4, 6, 8]
    # As if the process had died after step 8's samples but before its checkpoint: back to step 4.
    shutil.rmtree(run / "last")
    shutil.copytree(run / "step-00000004", run / "last")
    assert distill.main(["--config", str(config_file), "--run-name", "run", "--resume"]) == 0
    assert read_samples(run) == straight


def test_sample_prompts_zero_writes_no_samples_and_a_negative_count_is_refused(tmp_path, teacher_dir, data_file):
    config_file = sampled_config(tmp_path, teacher_dir, data_file, sample_prompts=0, max_steps=4)
    assert distill.main(["--config", str(config_file), "--run-name", "run"]) == 0
    assert not (tmp_path / "checkpoints" / "run" / "samples.jsonl").exists()
    with pytest.raises(ConfigError, match="sample_prompts"):
        load_config(sampled_config(tmp_path, teacher_dir, data_file, sample_prompts=-1))


def test_a_conversation_is_cut_where_its_first_answer_starts(tokenizer):
    """Chat samples (chat_data.py) count every non-target token in prompt_length: the cut is at the first assistant
    token instead; a conversation whose every token is a target (mask_instruction false) is cut in the middle."""
    from datasets import Dataset

    from distillation.training import samples

    user, answer, again, second = (
        tokenizer(text)["input_ids"] for text in ("Q: hi\nA:", " yes.", "\nQ: and?\nA:", " no.")
    )
    ids = [*user, *answer, *again, *second]
    masked = [False] * len(user) + [True] * len(answer) + [False] * len(again) + [True] * len(second)
    rows = Dataset.from_dict(
        {
            "input_ids": [ids, ids],
            "target_mask": [masked, [True] * len(ids)],
            "prompt_length": [1 + masked[1:].count(False), 1],
        }
    )
    masked_prompt, unmasked_prompt = samples.validation_prompts(rows, tokenizer, 2)
    assert masked_prompt.ids == user
    assert masked_prompt.reference == tokenizer.decode([*answer, *again, *second])
    assert unmasked_prompt.ids == ids[: len(ids) // 2]
