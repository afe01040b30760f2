"""config.yaml at GPT-2's real shapes (vocabulary 50257, a 50260-row teacher 768 wide, GPT-2's own BPE) at reduced
depth and length, offline, through the rehearsal benchmark: from the config to a `best/` that loads with
`from_pretrained`. The stand-ins have the file layout of the Hub repositories (assets/hub_standins.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

import dataset
import distill
from assets import hub_standins
from distillation.data import batching
from distillation.settings import templates
from distillation.settings.config import load_config
from helpers import REPO, check_a_distilled_pretrained_student
from loss import IGNORE_INDEX

pytestmark = pytest.mark.slow

ROWS = 40  # 24 train, 8 validation, 8 test
SHORT_ROWS = {"mean_words": 30.0, "max_words": 60}  # rows of about 80 tokens, to keep the run short


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    work = tmp_path_factory.mktemp("standins")
    teacher = hub_standins.save_teacher(work / hub_standins.TEACHER_DIRECTORY, layers=2)
    rows = hub_standins.alpaca_gpt4_rows(ROWS, seed=5, **SHORT_ROWS)
    return teacher, hub_standins.write_rows(work / hub_standins.DATA_FILE, rows), rows


def test_the_teacher_stand_in_has_the_hub_layout_and_shape(standins):
    teacher, _, _ = standins
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= {path.name for path in teacher.iterdir()}
    config = json.loads((teacher / "config.json").read_text())
    assert (config["vocab_size"], config["n_embd"], config["n_head"], config["n_positions"]) == (50260, 768, 12, 1024)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    assert len(tokenizer) == 50257 and tokenizer.convert_tokens_to_ids("<|endoftext|>") == 50256
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]  # GPT-2's ids


def test_the_default_template_tokenizes_as_the_text_column_at_gpt2_bpe(standins, tmp_path):
    """Every sample of every split is GPT-2's tokens of the row's `text` column, then EOS: the original's input."""
    teacher, data, rows = standins
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    spec = dataset.DataSpec(
        dataset=str(data),
        text_column=None,
        max_length=1024,
        split=(0.6, 0.2, 0.2),
        mask_instruction=False,
        max_samples=None,
        seed=0,
    )
    splits = dataset.prepare_splits(spec, tokenizer, str(tmp_path), "tokenized")
    produced = Counter(tuple(ids) for name in dataset.SPLIT_NAMES for ids in splits[name]["input_ids"])
    expected = Counter(tuple(tokenizer(row["text"])["input_ids"] + [50256]) for row in rows)
    assert produced == expected


def test_config_yaml_runs_at_real_shape_to_a_best_checkpoint(standins, tmp_path):
    """config.yaml as it runs on a CPU (float32; a bfloat16 run is emulated on CPUs without AMX or AVX-512 BF16, and
    takes minutes a step at this vocabulary)."""
    teacher, _, _ = standins
    overrides = [
        "distilled_model.nb_layers=1",
        "data.max_length=128",
        "training_parameters.batch_size=4",
        "training_parameters.gradient_accumulation_steps=2",
        "training_parameters.sample_prompts=1",
    ]
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.rehearsal",
            "--steps",
            "2",
            "--work",
            str(tmp_path),
            "--standins",
            str(teacher.parent),
            *(argument for override in overrides for argument in ("--set", override)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    assert figures["step_seconds"] > 0 and figures["real_tokens_per_s"] > 0 and figures["full_run_hours"] > 0
    # config.yaml: 52002 rows, 60% train, steps of 4 x 2 samples (as overridden here), 3 epochs.
    assert figures["full_run_steps"] == -(-31201 // 8) * 3

    run = tmp_path / "checkpoints" / "rehearsal"
    student = AutoModelForCausalLM.from_pretrained(run / "best")
    assert (student.config.vocab_size, student.config.n_embd, student.config.n_layer) == (50257, 768, 1)
    assert student.get_input_embeddings().weight.shape == (50257, 768)
    tokenizer = AutoTokenizer.from_pretrained(run / "best")
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == tokenizer.pad_token_id == 50256

    summary = json.loads((run / "summary.json").read_text())
    # Against the 50260-row teacher, cropped to the student's 50257: finite KL and agreement, the teacher's figures.
    assert summary["test"]["kl_teacher"] >= 0 and 0 <= summary["test"]["top1_agreement"] <= 1
    assert summary["teacher"]["test"]["perplexity"] > 1

    # Every sample's EOS is a target, though it is also the padding token: the run's data, batched as it trained.
    config = load_config(run / "config.yaml")
    spec = dataset.spec_from_config(config)
    assert spec.max_length == 128 and spec.template == templates.PROMPT_TEMPLATES["alpaca"]
    splits = dataset.prepare_splits(spec, tokenizer, config.paths.data_folder, config.paths.token_dataset)
    collate = batching.PaddingCollator(tokenizer.pad_token_id, spec.mask_instruction)
    for name in dataset.SPLIT_NAMES:
        samples = list(splits[name])
        batch = collate(samples)
        for row, sample in enumerate(samples):
            end = len(sample["input_ids"]) - 1
            if sample["input_ids"][end] == 50256:  # not cut at max_length
                assert batch["labels"][row, end] == 50256
            assert (batch["labels"][row, end + 1 :] == IGNORE_INDEX).all()
        assert sum(sample["input_ids"][-1] == 50256 for sample in samples) > 0


def test_the_distilgpt2_config_runs_at_real_shape_on_stand_ins(standins, tmp_path):
    """configs/seed_distilgpt2.yaml, the original's final experiment, offline: a distilgpt2-shaped pretrained
    stand-in (768 wide, 50257 rows, 1 of its 6 layers) fine-tuned by KD against the 50260-row teacher, cropped as for
    the untrained student, for a few steps; float32 throughout, as the original trained."""
    teacher, data, _ = standins
    student = hub_standins.save_distilgpt2(tmp_path / hub_standins.DISTILGPT2_DIRECTORY, layers=1)
    assert json.loads((student / "config.json").read_text())["vocab_size"] == 50257
    overrides = [
        f"teacher.name={teacher}",
        f"student.pretrained={student}",
        f"data.dataset={data}",
        f"paths.data_folder={tmp_path / 'data'}",
        f"paths.checkpoints={tmp_path / 'checkpoints'}",
        "data.max_length=128",
        "training_parameters.max_steps=2",
        "training_parameters.sample_prompts=1",
        "training_parameters.report_to=none",
    ]
    arguments = ["--config", str(REPO / "configs" / "seed_distilgpt2.yaml"), "--run-name", "distilgpt2"]
    assert distill.main(arguments + [item for override in overrides for item in ("--set", override)]) == 0
    run = tmp_path / "checkpoints" / "distilgpt2"
    best = AutoModelForCausalLM.from_pretrained(run / "checkpoint_best.pth")
    assert (best.config.vocab_size, best.config.n_embd, best.config.n_layer) == (50257, 768, 1)
    check_a_distilled_pretrained_student(run, teacher, student)


def test_a_merge_across_the_prompt_boundary_stays_and_is_a_target(standins):
    """Before a response that starts with a blank line, GPT-2 writes the prompt's final newline and the response's
    first one as one token (628): the sample keeps the text's tokens, and with mask_instruction that token, which
    holds response text, is a target."""
    teacher, _, _ = standins
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    prompt = dataset.alpaca_prompt("Say hi.", "")
    texts = Dataset.from_dict({"prompt": [prompt], "response": ["\n\nHi!"]})
    spec = dataset.DataSpec(
        dataset="unused",
        text_column=None,
        max_length=1024,
        split=(0.6, 0.2, 0.2),
        mask_instruction=True,
        max_samples=None,
        seed=0,
    )
    sample = dataset.tokenize(texts, tokenizer, spec)[0]
    assert sample["input_ids"] == tokenizer(prompt + "\n\nHi!")["input_ids"] + [50256]
    assert sample["input_ids"][sample["prompt_length"]] == 628  # "\n\n": the first target
    assert tokenizer.decode(sample["input_ids"][: sample["prompt_length"]]) == prompt[:-1]
